"""Network namespaces joined by a tbf-shaped veth pair: made, shaped, reachable, and removed.

Needs root and a working `ip netns`; without them these tests fail with the reason (the benchmark
itself falls back to the application-level shaper, tested below without namespaces).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from zeroc.bench.serve.netns import NetnsLink, netns_unavailable_reason, remove_stale_namespaces
from zeroc.bench.serve.topology import ShapedProxy

PAYLOAD = 1 << 20

RECEIVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
n = 0
while chunk := conn.recv(1 << 16):
    n += len(chunk)
print(n, flush=True)
"""

SENDER = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
t = time.perf_counter()
conn.sendall(bytes(int(sys.argv[3])))
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
print(time.perf_counter() - t, flush=True)
"""


@pytest.fixture(scope="module")
def netns_ok():
    reason = netns_unavailable_reason()
    if reason:
        pytest.fail(f"network namespaces are unavailable here: {reason}")


def _ns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _transfer(link: NetnsLink, nbytes: int) -> tuple[int, float]:
    """Send `nbytes` from the prefill namespace to the decode namespace over the link: (received, seconds)."""
    recv = subprocess.Popen([*link.prefix("decode"), sys.executable, "-c", RECEIVER, f"{link.net}.2"],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = recv.stdout.readline().strip()
        sent = subprocess.run([*link.prefix("prefill"), sys.executable, "-c", SENDER, f"{link.net}.2", port,
                               str(nbytes)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        return int(recv.stdout.readline()), float(sent.stdout)
    finally:
        recv.kill()
        recv.wait()


def test_link_is_made_shaped_and_removed(netns_ok):
    link = NetnsLink()
    try:
        assert sorted(link.exists()) == sorted(link.ns.values())
        link.set_link(8.0)
        received, seconds = _transfer(link, PAYLOAD)
        assert received == PAYLOAD
        # 1 MiB at 8 Mbit/s takes >= 1.05 s; a loaded machine can only make it slower.
        assert seconds >= 0.8 * PAYLOAD * 8 / 8e6
        qdisc = subprocess.run([*link.prefix("prefill"), "tc", "qdisc", "show", "dev", link.link_dev],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "8Mbit" in qdisc
        link.set_link(None)
        qdisc = subprocess.run([*link.prefix("prefill"), "tc", "qdisc", "show", "dev", link.link_dev],
                               capture_output=True, text=True).stdout
        assert "tbf" not in qdisc
    finally:
        link.close()
    assert link.exists() == [] and not any(ns in _ns_list() for ns in link.ns.values())
    devs = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"zcb{os.getpid()}" not in devs
    link.close()  # idempotent


def test_namespaces_of_a_dead_run_are_removed(netns_ok):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    name = f"zcb{dead}p"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in remove_stale_namespaces()
        assert name not in _ns_list()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    mine = NetnsLink()  # a live run's namespaces are left alone
    try:
        assert not set(mine.ns.values()) & set(remove_stale_namespaces())
    finally:
        mine.close()


def test_application_level_shaper_paces_prefill_to_decode():
    """The fallback: a proxy in this process passes bytes both ways, pacing the upstream -> client side."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with conn:
            assert conn.recv(5) == b"hello"
            conn.sendall(bytes(PAYLOAD // 4))

    threading.Thread(target=serve, daemon=True).start()
    proxy = ShapedProxy()
    try:
        proxy.set_link(4.0)
        host, port = proxy.prefill_for_decode(server.getsockname()[1]).rsplit(":", 1)
        with socket.create_connection((host, int(port))) as conn:
            start = time.perf_counter()
            conn.sendall(b"hello")
            got = 0
            while chunk := conn.recv(1 << 16):
                got += len(chunk)
            seconds = time.perf_counter() - start
        assert got == PAYLOAD // 4
        # 256 KiB at 4 Mbit/s: >= 0.52 s, less the bucket's initial burst of 64 KiB.
        assert seconds >= 0.8 * (PAYLOAD // 4 - 4 * ShapedProxy.CHUNK) * 8 / 4e6
    finally:
        proxy.close()
        server.close()
