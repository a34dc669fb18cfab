"""TLS, mTLS and bearer tokens with real certificates in real processes (`Stack(tls=True)`, as
`zeroc stack up --tls`): clients verify the services, services verify each other, internal RPCs are
refused to anyone without a certificate of the deployment's CA, and plaintext stays on loopback."""

from __future__ import annotations

import grpc
import pytest

from zeroc.client import Client, ClientError
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.pki import make_pki
from zeroc.sampling import SamplingParams
from zeroc.stack import ServiceProcess, Stack
from zeroc.tls import Tls, open_channel
from zeroc.v1 import kv_store_pb2 as kpb
from zeroc.v1 import generation_pb2, generation_pb2_grpc, kv_store_pb2_grpc, prefill_pb2, prefill_pb2_grpc

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tls-auth") / "tokens"
    tokens.write_text("t0ken alice\n")
    with Stack(1, env={"ZEROC_SECURITY_TOKENS_FILE": str(tokens)}, tls=True) as s:
        yield s


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


def test_clients_talk_tls_with_a_token_and_services_mtls(stack, bundled):
    ca = stack.pki.ca.read_bytes()
    decode = stack.services[1]
    want = Engine(bundled, CacheConfig()).generate([PROMPT], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    with Client(decode.address, ca=ca, token="t0ken") as c:  # decode -> prefill over mTLS for the KV
        got = c.generate(PROMPT, max_tokens=5, ignore_eos=True)
        assert got.token_ids == want.token_ids and got.usage.kv_bytes_received > 0
    with Client(decode.address, ca=ca) as c, pytest.raises(ClientError) as err:
        c.generate(PROMPT, max_tokens=1)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    # A plaintext client, or one trusting another CA, gets no connection at all.
    other = make_pki(stack.pki.ca.parent / "other")
    for kwargs in ({}, {"ca": other.ca.read_bytes()}):
        with Client(decode.address, token="t0ken", timeout=5, **kwargs) as c, pytest.raises(ClientError) as err:
            c.model_info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_internal_rpcs_need_a_certificate_of_the_deployment(stack):
    ca = stack.pki.ca.read_bytes()
    prefill, decode = stack.services
    fetch = kpb.FetchBlocksRequest(block_ids=["0" * 32], seed="x")
    prefill_req = prefill_pb2.PrefillRequest(token_ids=[5, 6, 7])
    # On the public ports (TLS, no client certificate): PERMISSION_DENIED, whoever asks.
    with open_channel(decode.address, ca=ca) as ch:
        assert code_of(lambda: list(kv_store_pb2_grpc.KvStoreServiceStub(ch).FetchBlocks(fetch, timeout=10))) \
            == grpc.StatusCode.PERMISSION_DENIED
    with open_channel(prefill.address, ca=ca) as ch:
        assert code_of(lambda: list(prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(prefill_req, timeout=10))) \
            == grpc.StatusCode.PERMISSION_DENIED
    # The internal port wants a client certificate of the deployment's CA.
    other = make_pki(stack.pki.ca.parent / "intruder")
    intruder = Tls(ca, other.cert.read_bytes(), other.key.read_bytes())
    with open_channel(prefill.internal_address, intruder) as ch:
        assert code_of(lambda: list(prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(prefill_req, timeout=5))) \
            == grpc.StatusCode.UNAVAILABLE
    service = Tls(ca, stack.pki.cert.read_bytes(), stack.pki.key.read_bytes())
    with open_channel(prefill.internal_address, service) as ch:
        replies = list(prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(prefill_req, timeout=30))
        assert replies[-1].summary.num_tokens == 3
    with open_channel(decode.internal_address, service) as ch:
        code = code_of(lambda: list(kv_store_pb2_grpc.KvStoreServiceStub(ch).FetchBlocks(fetch, timeout=10)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # past the identity check: the seed is wrong


def test_model_info_names_the_index_and_holder_and_counts_activity_only_to_services(stack):
    ca = stack.pki.ca.read_bytes()
    decode = stack.services[1]
    with Client(decode.address, ca=ca, token="t0ken") as c:  # a tenant on the public port
        c.generate(PROMPT, max_tokens=1)  # some store activity: a lookup, a block offered
        public = c.model_info().kv_store
    assert public.state == "ok" and public.capacity_blocks > 0  # state and capacity stay
    assert public.index == "" and public.holder == ""
    # Counters summed over every tenant would show one tenant the others' cache traffic: none are given.
    counters = ("blocks_held", "lookups", "hit_tokens", "peer_blocks", "index_errors", "reconnects", "evictions")
    assert all(getattr(public, f) == 0 for f in counters)
    service = Tls(ca, stack.pki.cert.read_bytes(), stack.pki.key.read_bytes())
    with open_channel(decode.internal_address, service) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        internal = stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=10,
                                     metadata=(("authorization", "Bearer t0ken"),)).kv_store
    assert internal.holder == decode.internal_address and internal.lookups > 0 and internal.blocks_held > 0
    assert internal.index == stack.redis_url  # the embedded Redis: no password to redact


def test_plaintext_is_refused_off_loopback():
    with pytest.raises(RuntimeError, match="plaintext gRPC is only allowed on loopback"):
        ServiceProcess("decode", ["--colocated"], host="0.0.0.0", start_timeout_s=120)


def test_the_cli_client_speaks_tls_with_a_token(stack):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "zeroc.cli", "generate", "--target", stack.decode[0], "--ca",
                          str(stack.pki.ca), "--token", "t0ken", "--max-tokens", "2", "--json", "The built-in"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    assert json.loads(run.stdout.strip().splitlines()[-1])["usage"]["completion_tokens"] == 2
