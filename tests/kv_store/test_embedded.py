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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sentinel_urls_reach_the_master_sentinel_names(tmp_path):
    from kv_store.embedded import connect, redis_server_binary
    from kv_store.index import BlockEntry, RedisBlockIndex

    master_port, sentinel_port = _free_port(), _free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor zc 127.0.0.1 {master_port} 1\n")
    procs = [subprocess.Popen([redis_server_binary(), "--port", str(master_port), "--bind", "127.0.0.1",
                               "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL),
             subprocess.Popen([redis_server_binary(), str(conf), "--sentinel", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)]
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/zc"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert connect(url, 1.0).ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "sentinel never named the master"
                time.sleep(0.2)
        index = RedisBlockIndex(url)
        index.register("h:1", 30)
        index.put("h:1", [BlockEntry("a" * 32, "cpu", 1, 2)])
        assert redis.Redis(port=master_port).hexists("{zeroc}:blk:" + "a" * 32, "h:1")  # written on the master
        index.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_passwords_never_reach_logs_or_model_info():
    from kv_store.service import redact

    assert redact("rediss://user:s3cret@redis.internal:6380/0") == "rediss://user:***@redis.internal:6380/0"
    assert redact("redis://:s3cret@h:6379") == "redis://:***@h:6379"
    assert redact("unix:///tmp/x/redis.sock") == "unix:///tmp/x/redis.sock"
