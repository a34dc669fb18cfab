"""Tokenizer: a thin wrapper over a Hugging Face `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from zeroc.config import ConfigError


class Tokenizer:
    def __init__(self, backend: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | list | None = None):
        self.backend = backend
        self.chat_template = chat_template  # kept as tokenizer_config.json has it, so `save` writes it back
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"{path}: cannot parse tokenizer ({exc})") from exc
        bos = eos = template = None
        tok_cfg = Path(model_dir) / "tokenizer_config.json"
        if tok_cfg.is_file():
            raw = json.loads(tok_cfg.read_text())
            bos, eos = _token_str(raw.get("bos_token")), _token_str(raw.get("eos_token"))
            template = raw.get("chat_template")
        return cls(backend, bos, eos, template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def pieces(self, ids: list[int]) -> list[str]:
        """The vocabulary's own spelling of each id ("Ġthe", "▁the", "<0xE6>"), as transformers'
        convert_ids_to_tokens gives it; "" for an id it does not know."""
        return [self.backend.id_to_token(t) or "" for t in ids]

    def token_text(self, token_id: int) -> str:
        """One token's text as it would print on its own (U+FFFD where it holds part of a character)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes, whole where its text is part of a character: a byte-fallback piece ("<0xE6>") or a
        byte-level BPE piece (GPT-2's byte-to-character map) read back to its bytes."""
        text = self.token_text(token_id)
        if "\ufffd" not in text:
            return text.encode()
        piece = self.backend.id_to_token(token_id) or ""
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            return bytes([int(m.group(1), 16)])
        chars = _byte_level_chars()
        return bytes(chars[c] for c in piece) if piece and all(c in chars for c in piece) else text.encode()

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's printable stand-in of each byte (GPT-2's `bytes_to_unicode`), character -> byte: bytes
    that print as themselves keep their character, the other 68 take 256, 257, ... in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def _token_str(value: object) -> str | None:
    # tokenizer_config.json holds tokens either as strings or as {"content": ...} objects.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Each call decodes a window of the last tokens, not the whole list (TGI's and vLLM's scheme), so a token
    costs the same at any length: the text of ids[prefix:read] is what the window already gave, the text of
    ids[prefix:] what it gives now, and their difference is the delta. The window keeps the tokens of the
    previous delta as left context, for tokenizers that decode a token differently at the start of a text
    (SentencePiece's leading space). While the text ends in a partial character it waits for the rest."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # where the window starts
        self._read = 0  # ids[:read] are in text

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new text they complete (may be empty while a char is partial)."""
        self.ids.extend(token_ids)
        window, seen = self.ids[self._prefix:], self._read - self._prefix
        before = self.tokenizer.decode(window[:seen], self.skip) if seen > 0 else ""
        now = self.tokenizer.decode(window, self.skip)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta
