"""`zeroc serve prefill --sp 2`: sequence-parallel prefill on two gloo processes, shipping its KV
to a decode service like any prefill. Real processes throughout; the single-rank reference is the
session's `services` stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
import torch

from zeroc.client import Client
from zeroc.kv_transfer import decode_chunk
from zeroc.stack import ServiceProcess
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc

PROMPTS = ["The built-in function len() returns the number of items of an object. The argument may be a "
           "sequence (such as a string, bytes, tuple, list, or range) or a collection",
           "import os\nprint(os.getcwd())", "A list comprehension"]


@pytest.fixture(scope="module")
def sp_stack():
    procs = []
    try:
        procs.append(ServiceProcess("prefill", ["--sp", "2"]))
        procs.append(ServiceProcess("decode", ["--prefill", procs[0].address],
                                    env={"ZEROC_TRANSFER_CHUNK_BYTES": "4096"}))
        for p in procs:
            p.wait_serving()
        yield procs[0].address, procs[1].address
    finally:
        for p in reversed(procs):
            p.stop()


def _layer_kv(target: str, ids: list[int]) -> tuple[dict, prefill_pb2.PrefillSummary]:
    """Prefill `ids` at `target`: {(layer, is_key): [T, kv_heads, width]} and the summary."""
    stub = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(target))
    replies = list(stub.Prefill(prefill_pb2.PrefillRequest(token_ids=ids, max_chunk_bytes=8192), timeout=120))
    parts: dict = {}
    for piece in (decode_chunk(r.chunk) for r in replies[:-1]):
        parts.setdefault((piece.layer, piece.is_key), []).append((piece.first_token, piece.data))
    return {key: torch.cat([d for _, d in sorted(v, key=lambda p: p[0])]) for key, v in parts.items()}, replies[-1].summary


def test_sp_prefill_ships_the_same_kv_as_single_rank_prefill(sp_stack, services, bundled):
    ids = bundled.tokenizer.encode(PROMPTS[0] * 3)
    sp, sp_summary = _layer_kv(sp_stack[0], ids)
    ref, ref_summary = _layer_kv(services.prefill, ids)
    assert sp.keys() == ref.keys() and len(sp) == 2 * bundled.config.num_hidden_layers
    assert (sp_summary.num_tokens, sp_summary.num_layers, sp_summary.kv_bytes) == \
        (ref_summary.num_tokens, ref_summary.num_layers, ref_summary.kv_bytes)
    for key in ref:
        assert sp[key].shape == ref[key].shape == (len(ids), bundled.config.num_key_value_heads, 64)
        assert (sp[key] - ref[key]).abs().max().item() < 1e-4, key


def test_a_decode_service_fed_by_sp_prefill_generates_what_single_rank_prefill_gives(sp_stack, services):
    with Client(sp_stack[1]) as sp_client, Client(services.decode) as ref_client:
        for prompt in PROMPTS:
            got = sp_client.generate(prompt, max_tokens=12, ignore_eos=True)
            want = ref_client.generate(prompt, max_tokens=12, ignore_eos=True)
            assert got.token_ids == want.token_ids and len(got.token_ids) == 12
            # Either decode service may reuse a cached prefix from its KV store; per shipped token the
            # bytes must agree (the last prompt token is computed by decode, never shipped).
            per_token = [r.usage.kv_bytes_received / (r.usage.prompt_tokens - 1 - r.usage.cached_prefix_tokens)
                         for r in (got, want)]
            assert per_token[0] == per_token[1] > 0
        info = sp_client.model_info()
        assert info.kv_blocks_free == info.kv_blocks_total


def test_a_dead_rank_turns_requests_into_unavailable_not_a_hang():
    prefill = ServiceProcess("prefill", ["--sp", "2"])
    try:
        prefill.wait_serving()
        ranks = subprocess.run(["pgrep", "-P", str(prefill.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 1  # rank 1; rank 0 is the service process itself
        stub = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(prefill.address))
        request = prefill_pb2.PrefillRequest(token_ids=[1, 2, 3, 4, 5])
        assert list(stub.Prefill(request, timeout=60))[-1].summary.num_tokens == 5
        os.kill(int(ranks[0]), signal.SIGKILL)
        for _ in range(2):  # the failing request, and every later one
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Prefill(request, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "sequence-parallel" in err.value.details()
    finally:
        assert prefill.stop() == 0


@pytest.mark.parametrize("args, words", [
    (["--sp", "0"], "sp_ranks must be in [1, 64]"),
    (["--sp", "7"], "--sp must be in [2, 6]"),  # more ranks than the bundled model's 6 query heads
    (["--sp", "2", "--device", "cuda"], "--sp runs its ranks on gloo and needs --device cpu"),
])
def test_impossible_sp_settings_exit_2_with_one_line(args, words):
    out = subprocess.run([sys.executable, "-m", "zeroc.cli", "serve", "prefill", "--port", "0", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("zeroc: error: ") and words in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
