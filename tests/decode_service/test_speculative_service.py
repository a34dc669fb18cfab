"""Speculative decoding in a real decode service (`--speculative-tokens`): behind a real prefill service, its greedy
streams are the session's decode service's token for token, beside sampled requests, it frees every block, and its
Prometheus counters say how many draft tokens it checked and kept, consistently with the tokens streamed."""

from __future__ import annotations

import pytest

from service_checks import Scrape, assert_no_leak, free_port
from zeroc.client import Client
from zeroc.stack import ServiceProcess

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "import os\nimport os\n", "The built-in function"]


@pytest.fixture(scope="module")
def speculating(services, embedded_redis):
    port = free_port()
    proc = ServiceProcess("decode", ["--prefill", services.prefill, "--speculative-tokens", "4"],
                          env={"ZEROC_REDIS_URL": embedded_redis.url, "ZEROC_METRICS_PORT": str(port)})
    try:
        proc.wait_serving()
        yield proc.address, port
    finally:
        proc.stop()


def test_a_speculating_service_streams_plain_greedys_tokens(services, speculating):
    speculating, port = speculating
    with Client(services.decode, timeout=120) as plain, Client(speculating, timeout=120) as spec:
        for prompt in PROMPTS:
            want = plain.generate(prompt, max_tokens=40, ignore_eos=True)
            chunks = list(spec.stream(prompt, max_tokens=40, ignore_eos=True))
            got = [t for c in chunks[:-1] for t in c.token_ids]
            assert got == want.token_ids and "".join(c.text for c in chunks[:-1]) == want.text
            assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].finish_reason == "length"
        sampled = spec.generate(PROMPTS[0], max_tokens=12, temperature=0.9, seed=7)
        assert sampled.token_ids == plain.generate(PROMPTS[0], max_tokens=12, temperature=0.9, seed=7).token_ids
    assert_no_leak(speculating)
    got = Scrape(port)
    drafts, checked = got("zeroc:spec_decode_num_drafts_total"), got("zeroc:spec_decode_num_draft_tokens_total")
    kept = got("zeroc:spec_decode_num_accepted_tokens_total")
    assert 0 < kept <= checked <= 4 * drafts  # the repeating prompt's drafts held, partly at least
    assert got("zeroc:generation_tokens_total") == 3 * 40 + 12
