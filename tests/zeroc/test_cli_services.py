"""`zeroc serve`, `zeroc generate --target` and `zeroc stack up` as real processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request

import pytest

from zeroc.client import Client

from cli_runs import zeroc


def test_generate_against_a_target_matches_local_generation(services):
    remote = zeroc("generate", "--target", services.decode, "--json", "--max-tokens", "8", "The built-in function")
    local = zeroc("generate", "--json", "--max-tokens", "8", "The built-in function")
    assert remote.returncode == 0, remote.stderr
    a, b = json.loads(remote.stdout), json.loads(local.stdout)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["usage"]["prompt_tokens"] > 0 and a["usage"]["kv_bytes_received"] > 0
    args = ("--json", "--max-tokens", "2", "--prompt-logprobs", "2", "The built-in function")
    remote, local = zeroc("generate", "--target", services.decode, *args), zeroc("generate", *args)
    a, b = json.loads(remote.stdout), json.loads(local.stdout)
    assert len(a["prompt_logprobs"]) == a["usage"]["prompt_tokens"] - 1 and a["usage"]["kv_bytes_received"] == 0
    want = [lp["logprob"] for lp in b["prompt_logprobs"]]
    assert [lp["logprob"] for lp in a["prompt_logprobs"]] == pytest.approx(want, abs=1e-4)


def test_user_errors_are_one_line_and_exit_2():
    no_prefill = zeroc("serve", "decode", "--port", "0", env={**os.environ, "ZEROC_TRANSFER_PREFILL_TARGET": ""})
    assert no_prefill.returncode == 2 and "--prefill" in no_prefill.stderr
    assert len(no_prefill.stderr.strip().splitlines()) == 1
    unreachable = zeroc("generate", "--target", "127.0.0.1:1", "hello")
    assert unreachable.returncode == 2 and "UNAVAILABLE" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
    for args, words in ((("serve", "decode", "--colocated", "--redis-url", "foo://x"), "redis url"),
                        (("stack", "up", "--redis-url", "http://x"), "redis url"),
                        (("bench", "prefix", "--shared", "1.5"), "shared")):
        bad = zeroc(*args)
        assert bad.returncode == 2 and bad.stderr.startswith("zeroc: error:") and words in bad.stderr, bad.stderr


def test_stack_up_serves_on_every_decode_address_and_stops_its_children():
    proc = subprocess.Popen([sys.executable, "-m", "zeroc.cli", "stack", "up", "--decode", "2", "--gateway"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = []
        while not (lines and lines[-1].startswith("ready")):
            line = proc.stdout.readline()
            assert line, f"stack exited early: {proc.stderr.read()}"
            lines.append(line)
        decode = [m.group(1) for ln in lines if (m := re.match(r"decode service:\s+(\S+)", ln))]
        assert len(decode) == 2 and decode[0] in lines[-1]
        index = next(m.group(1) for ln in lines if (m := re.match(r"kv store index:\s+unix://(\S+) \(embedded\)", ln)))
        outs = []
        for target in decode:
            with Client(target) as c:
                outs.append(c.generate("The built-in function", max_tokens=5, ignore_eos=True).token_ids)
                assert c.model_info().kv_store.index == f"unix://{index}"  # one index shared by all services
        assert outs[0] == outs[1] and len(outs[0]) == 5
        # The gateway's curl line works as printed (non-streamed here) and answers with the same tokens.
        curl = next(ln.removeprefix("try: ") for ln in lines if ln.startswith("try: curl -N http://"))
        body = json.loads(shlex.split(curl)[-1])
        url = re.search(r"(http://\S+/v1/completions)", curl).group(1)
        request = urllib.request.Request(url, json.dumps({**body, "stream": False, "max_tokens": 5, "temperature": 0,
                                                          "ignore_eos": True, "return_token_ids": True}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            assert json.loads(reply.read())["choices"][0]["token_ids"] == outs[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert not os.path.exists(index)  # the embedded Redis stopped with the stack
    with Client(decode[0], timeout=5) as c:  # its children are gone
        try:
            c.model_info()
            alive = True
        except Exception:
            alive = False
    assert not alive
    try:
        urllib.request.urlopen(url.replace("/v1/completions", "/health"), timeout=5)
        gateway_alive = True
    except OSError:
        gateway_alive = False
    assert not gateway_alive
