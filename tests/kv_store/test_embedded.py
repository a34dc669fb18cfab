"""The embedded redis-server: started, stopped and never outliving the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import redis

from kv_store.embedded import EmbeddedRedis

CHILD = """
import sys, time
from kv_store.embedded import EmbeddedRedis
server = EmbeddedRedis().start()
print(server.proc.pid, server.url, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie awaiting its reaper counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_start_ping_stop_and_cleanup():
    server = EmbeddedRedis().start()
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    assert client.config_get("save")["save"] == "" and client.config_get("appendonly")["appendonly"] == "no"
    pid, workdir = server.proc.pid, server.dir
    server.close()
    assert not alive(pid) and not workdir.exists()


def test_a_killed_parent_takes_its_redis_server_with_it():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pid_text, url = child.stdout.readline().split()
        server_pid = int(pid_text)
        assert redis.Redis.from_url(url).ping()
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while alive(server_pid):
            assert time.monotonic() < deadline, "redis-server outlived its parent"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
