"""A KIVI stack in real processes: prefill and decode services both running `--kv-policy kivi-4`."""

from __future__ import annotations

import grpc
import pytest

from zeroc.client import Client
from zeroc.config import BUNDLED_MODEL, CacheConfig
from zeroc.engine import Engine
from zeroc.kv_transfer import model_fingerprint
from zeroc.sampling import SamplingParams
from zeroc.stack import ServiceProcess
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc

from service_checks import assert_no_leak

PROMPTS = ["Lists are mutable sequences, typically used to store collections of homogeneous items. " * 3,
           "The built-in function"]
CACHE_BYTES = 4 << 20


@pytest.fixture(scope="module")
def kivi_stack():
    procs = []
    try:
        procs.append(ServiceProcess("prefill", ["--kv-policy", "kivi-4"]))
        procs.append(ServiceProcess("decode", ["--prefill", procs[0].address, "--kv-policy", "kivi-4",
                                               "--cache-bytes", "4M"], env={"ZEROC_TRANSFER_CHUNK_BYTES": "4096"}))
        for p in procs:
            p.wait_serving()
        yield procs[0].address, procs[1].address
    finally:
        for p in procs:
            p.stop()


def test_disaggregated_kivi_equals_the_colocated_engine(kivi_stack, bundled):
    prefill, decode = kivi_stack
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    direct = Engine(bundled, CacheConfig(block_size=32, kv_policy="kivi-4")).generate(PROMPTS, params)
    cfg = bundled.config
    with Client(decode) as client:
        info = client.model_info()
        assert info.kv_block_size == 32
        assert info.kv_blocks_total == CACHE_BYTES // 36864  # a packed 4-bit block of the bundled model, fp32
        for prompt, want in zip(PROMPTS, direct):
            got = client.generate(prompt, max_tokens=16, ignore_eos=True)
            assert got.token_ids == want.token_ids
            # Encode on arrival: the wire carries full-precision K/V of all but the last prompt token.
            n = len(want.prompt_token_ids)
            assert got.usage.kv_bytes_received == (n - 1) * cfg.num_hidden_layers * 2 * 2 * 64 * 4
    assert_no_leak(decode)


def test_kv_of_another_policy_is_refused(kivi_stack):
    prefill, _ = kivi_stack
    stub = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(prefill))
    plain = prefill_pb2.PrefillRequest(token_ids=[5, 6, 7], model_fingerprint=model_fingerprint(BUNDLED_MODEL))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Prefill(plain, timeout=60))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_colocated_palu_service_equals_the_engine(bundled):
    """`zeroc serve decode --colocated --kv-policy palu`: the bases are fitted at startup from the weights."""
    proc = ServiceProcess("decode", ["--colocated", "--kv-policy", "palu", "--kv-budget", "0.5", "--cache-bytes", "2M"])
    try:
        proc.wait_serving()
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        direct = Engine(bundled, CacheConfig(kv_policy="palu", kv_budget=0.5)).generate(PROMPTS, params)
        with Client(proc.address) as client:
            # Rank-32 latents of K and V: 16 tokens x 6 layers x 2 heads x 64 numbers x 4 bytes a block.
            assert client.model_info().kv_blocks_total == (2 << 20) // 49152
            for prompt, want in zip(PROMPTS, direct):
                assert client.generate(prompt, max_tokens=12, ignore_eos=True).token_ids == want.token_ids
        assert_no_leak(proc.address)
    finally:
        proc.stop()


def test_int8_on_a_zeroc_model_disaggregated_equals_the_colocated_engine(zeroc_half_dir):
    """`zeroc serve --model <ZeroC dir> --kv-policy int8`: the decode side encodes the prefill's KV on arrival."""
    from zeroc.loader import load_model

    procs = []
    try:
        procs.append(ServiceProcess("prefill", ["--model", zeroc_half_dir, "--kv-policy", "int8"]))
        procs.append(ServiceProcess("decode", ["--model", zeroc_half_dir, "--prefill", procs[0].address,
                                               "--kv-policy", "int8", "--cache-bytes", "1M"],
                                    env={"ZEROC_TRANSFER_CHUNK_BYTES": "4096"}))
        for p in procs:
            p.wait_serving()
        loaded = load_model(zeroc_half_dir)
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        direct = Engine(loaded, CacheConfig(kv_policy="int8")).generate(PROMPTS, params)
        with Client(procs[1].address) as client:
            info = client.model_info()
            # a block of 16 tokens: 6 layers x 16 x (2 heads x (32 + 32) int8 codes + 2 x 2 fp32 scales)
            assert info.kv_blocks_total == (1 << 20) // (6 * 16 * 144)
            for prompt, want in zip(PROMPTS, direct):
                got = client.generate(prompt, max_tokens=12, ignore_eos=True)
                assert got.token_ids == want.token_ids
                n = len(want.prompt_token_ids)  # the wire carries the compressed rows at full precision (fp32)
                assert got.usage.kv_bytes_received == (n - 1) * 6 * 2 * 2 * 32 * 4
        assert_no_leak(procs[1].address)
    finally:
        for p in procs:
            p.stop()
