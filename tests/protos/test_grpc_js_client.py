"""A client no one here wrote: Node's grpc-js, loading protos/zeroc/v1/generation.proto at run time, against the
session's real decode service over a socket. It streams what the Python SDK streams (tokens, text, finish
reason, log-probabilities, with penalties and a logit bias set), and a bad field gets INVALID_ARGUMENT.

Needs node and npm (`.ci/run` installs Debian's if missing); the client's packages come from npm, pinned by
tests/protos/grpc_js/package-lock.json."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from zeroc.client import Client

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).resolve().parent / "grpc_js"


@pytest.fixture(scope="module")
def node_client():
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed for the grpc-js client test (apt-get install nodejs npm)"
    out = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    def generate(target: str, request: dict) -> dict:
        r = subprocess.run([node, "generate.js", target, str(ROOT / "protos"), json.dumps(request)], cwd=CLIENT,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    return generate


def test_grpc_js_streams_what_the_python_sdk_does(services, node_client):
    sampling = {"max_tokens": 10, "ignore_eos": True, "logprobs": 2, "repetition_penalty": 1.2,
                "frequency_penalty": 0.4}
    with Client(services.decode) as sdk:
        banned = sdk.generate("def read_file(path):", max_tokens=1).token_ids[0]
        want = sdk.generate("def read_file(path):", **sampling, logit_bias={banned: -100.0})
    got = node_client(services.decode, {"request_id": "from-node", "prompt": "def read_file(path):",
                                        "sampling": {**sampling, "logit_bias": {str(banned): -100}}})
    assert "error" not in got, got
    tokens = [t for d in got["deltas"] for t in d["token_ids"]]
    assert tokens == want.token_ids and banned not in tokens
    assert "".join(d["text"] for d in got["deltas"]) == want.text
    assert got["result"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert int(got["result"]["usage"]["completion_tokens"]) == 10
    logprobs = [lp for d in got["deltas"] for lp in d["logprobs"]]
    assert [lp["logprob"] for lp in logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-6)
    assert [lp["top_token_ids"] for lp in logprobs] == [[t for t, _ in lp.top] for lp in want.logprobs]


def test_grpc_js_gets_invalid_argument_for_a_bad_field(services, node_client):
    got = node_client(services.decode, {"prompt": "x", "sampling": {"logprobs": 21}})
    assert got["error"]["code"] == 3 and "logprobs" in got["error"]["details"]  # INVALID_ARGUMENT
    got = node_client(services.decode, {"prompt": "x", "sampling": {"logit_bias": {"4000000": 1}}})
    assert got["error"]["code"] == 3 and "logit_bias" in got["error"]["details"]
