"""The incremental detokenizer: streamed deltas add up to the whole decode at every step, characters split over
several tokens are held back until complete, and each token decodes a bounded window, not the whole text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from zeroc.config import BUNDLED_MODEL
from zeroc.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = "héllo wörld, 日本語 🙂 and ünïcödé — the end.\n  def f(x):\n\treturn x ** 2  # ok"


@pytest.fixture(scope="module")
def bundled_tok() -> Tokenizer:
    return Tokenizer.from_dir(BUNDLED_MODEL)  # byte-level BPE: CJK and emoji split over several tokens


@pytest.fixture(scope="module")
def metaspace_tok() -> Tokenizer:
    """A SentencePiece-style BPE (Metaspace: a word's leading space is part of its token, and decoding drops
    the space of a text's first token), trained here on a few lines."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    lines = [TEXT, "the quick brown fox jumps over the lazy dog", "hello world " * 5, "日本語 のテキスト"] * 20
    hf.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    return Tokenizer(hf)


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok)
    deltas = []
    for i in ids:
        deltas.append(detok.add([i]))
        whole = tok.decode(detok.ids)
        # what was streamed is the whole text so far, less at most a trailing partial character
        assert "".join(deltas) == detok.text and whole.startswith(detok.text)
        if not whole.endswith("\ufffd"):
            assert detok.text == whole
    return deltas, detok


@pytest.mark.parametrize("name", ["bundled_tok", "metaspace_tok"])
def test_streaming_a_text_token_by_token_gives_its_decode(request, name):
    tok = request.getfixturevalue(name)
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas, detok = _stream(tok, ids)
    assert detok.text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # a split character comes out whole, once complete


def test_a_character_split_over_tokens_waits_until_it_is_whole(bundled_tok):
    ids = bundled_tok.encode("a 🙂", add_special_tokens=False)
    pieces = [bundled_tok.decode([i]) for i in ids]
    assert sum(p == "\ufffd" for p in pieces) >= 2  # the emoji is several byte tokens here
    deltas, _ = _stream(bundled_tok, ids)
    assert deltas[-1].endswith("🙂") and "" in deltas


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 300), st.integers(0, 8191)), min_size=1, max_size=60))  # 0-255: bytes
def test_random_ids_stream_their_decode(ids):
    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    _stream(tok, ids)


def test_each_token_decodes_a_bounded_window(bundled_tok):
    """The cost of a token does not grow with the text: every decode call sees a handful of ids."""
    sizes = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return bundled_tok.decode(ids, skip_special_tokens)

    detok = IncrementalDetokenizer(Counting())
    for i in bundled_tok.encode(TEXT * 20, add_special_tokens=False):
        detok.add([i])
    assert len(detok.ids) > 500 and max(sizes) <= 8


def test_token_bytes_make_up_the_text_where_tokens_split_a_character():
    """Byte-level BPE (the bundled tokenizer) splits 日 over three tokens that each print as U+FFFD alone; their
    bytes, read back through the byte-to-character map, make up the text's UTF-8. A byte-fallback piece
    (SentencePiece's "<0xE6>") is its byte."""
    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    text = "def read_file(path): é 日本\n\t x"
    ids = tok.encode(text, add_special_tokens=False)
    assert "\ufffd" in [tok.token_text(i) for i in ids]
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    backend = HFTokenizer(models.WordLevel({"<0xE6>": 0, "a": 1, "<unk>": 2}, unk_token="<unk>"))
    backend.decoder = decoders.ByteFallback()
    fallback = Tokenizer(backend)
    assert fallback.token_text(0) == "\ufffd" and fallback.token_bytes(0) == b"\xe6" and fallback.token_bytes(1) == b"a"


def test_special_tokens_text_is_streamed_only_when_kept(bundled_tok):
    """`skip_special_tokens` False streams a special token's text (a marker a client parses) as the whole decode
    with it kept; the default leaves it out."""
    ids = bundled_tok.encode("Call the tool", add_special_tokens=False)
    ids = ids[:2] + [1] + ids[2:]  # 1: </s>, a special token
    kept, skipped = IncrementalDetokenizer(bundled_tok, skip_special_tokens=False), IncrementalDetokenizer(bundled_tok)
    assert "".join(kept.add([i]) for i in ids) == bundled_tok.decode(ids, skip_special_tokens=False)
    assert "</s>" in kept.text and "".join(skipped.add([i]) for i in ids) == bundled_tok.decode(ids) == "Call the tool"
