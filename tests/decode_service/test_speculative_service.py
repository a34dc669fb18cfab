"""Speculative decoding in a real decode service (`--speculative-tokens`): behind a real prefill service, its greedy
and seeded sampled streams are the session's decode service's token for token (log-probabilities too), it frees
every block, and its Prometheus counters say how many draft tokens it checked and kept, consistently with the tokens
streamed."""

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
        for temperature in (0.9, 0.3):  # sampled ones speculate too, to the tokens they sample without
            sampled = spec.generate(PROMPTS[0], max_tokens=12, temperature=temperature, seed=7)
            want = plain.generate(PROMPTS[0], max_tokens=12, temperature=temperature, seed=7)
            assert sampled.token_ids == want.token_ids
        with_logprobs = spec.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, logprobs=2)  # one per kept token
        want = plain.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, logprobs=2)
        assert with_logprobs.token_ids == want.token_ids and len(with_logprobs.logprobs) == 12
        assert [lp.logprob for lp in with_logprobs.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs],
                                                                              abs=1e-4)
        assert [[t for t, _ in lp.top] for lp in with_logprobs.logprobs] == [[t for t, _ in lp.top]
                                                                             for lp in want.logprobs]
    assert_no_leak(speculating)
    got = Scrape(port)
    drafts, checked = got("zeroc:spec_decode_num_drafts_total"), got("zeroc:spec_decode_num_draft_tokens_total")
    kept = got("zeroc:spec_decode_num_accepted_tokens_total")
    assert 0 < kept <= checked <= 4 * drafts  # the repeating prompt's drafts held, partly at least
    assert got("zeroc:generation_tokens_total") == 3 * 40 + 3 * 12
