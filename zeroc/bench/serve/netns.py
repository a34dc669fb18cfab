"""Two network namespaces joined by a shaped veth pair: a real, rate-limited prefill -> decode link.

Layout (10.213.N.0/24, N picked free on this host; interface names carry this process's pid):

    root ns ── admin veth (.5 | .6) ──▶ prefill ns ── link veth (.1 | .2), tbf on the prefill end ──▶ decode ns
    root ns ── client veth (.9 | .10) ─────────────────────────────────────────────────────────────▶ decode ns

The prefill service listens on every address of its namespace (the benchmark health-checks it over
the admin veth, decode reaches it over the link); decode listens on its client address. Only the
prefill -> decode direction is shaped (`tc qdisc replace ... tbf`), which is where the KV flows;
`netem` is not used (it does not work on these hosts). Needs root and `ip netns`.

Everything is removed by `close()`, which runs from the caller's `finally` and, as a last resort,
from `atexit`; namespaces left by a killed earlier run (its pid gone) are removed on creation.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess

from zeroc.bench.serve.topology import Topology

_STALE = re.compile(r"^zcb(\d+)[pd]$")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, or the kernel refuses)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None if a probe namespace could be made and removed."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "`ip` or `tc` (iproute2) is not installed"
    probe = f"zcb{os.getpid()}p"
    try:
        _ip("netns", "add", probe)
    except NetnsUnavailable as exc:
        return str(exc)
    _ip("netns", "del", probe, check=False)
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces of earlier benchmark runs whose process is gone; returns their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _STALE.match(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> int:
    used = _ip("-4", "-o", "addr", "show", check=False).stdout + _ip("-4", "route", check=False).stdout
    for n in [*range(os.getpid() % 250, 250), *range(0, os.getpid() % 250)]:
        if f"10.213.{n}." not in used:
            return n
    raise NetnsUnavailable("no free 10.213.N.0/24 subnet on this host")


class NetnsLink(Topology):
    """Prefill and decode in their own namespaces, the link between them shaped with tbf."""

    def __init__(self) -> None:
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale_namespaces()
        tag = f"zcb{os.getpid()}"
        self.ns = {"prefill": f"{tag}p", "decode": f"{tag}d"}
        self.link_dev = f"{tag}lp"  # the prefill end of the link, where tbf sits
        self._root_devs = [f"{tag}ap", f"{tag}cd"]
        self.net = f"10.213.{_free_subnet()}"
        self.mbit: float | None = None
        self._closed = False
        atexit.register(self.close)
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    def _build(self, tag: str) -> None:
        p, d, net = self.ns["prefill"], self.ns["decode"], self.net
        for ns in (p, d):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # (root-or-ns end, its address, peer end, peer namespace, peer address)
        pairs = [(self.link_dev, p, f"{net}.1/30", f"{tag}ld", d, f"{net}.2/30"),
                 (f"{tag}ap", None, f"{net}.5/30", f"{tag}aq", p, f"{net}.6/30"),
                 (f"{tag}cd", None, f"{net}.9/30", f"{tag}ce", d, f"{net}.10/30")]
        for dev, dev_ns, dev_addr, peer, peer_ns, peer_addr in pairs:
            _ip("link", "add", dev, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", peer_ns)
            if dev_ns:
                _ip("link", "set", dev, "netns", dev_ns)
            for name, ns, addr in ((dev, dev_ns, dev_addr), (peer, peer_ns, peer_addr)):
                where = ("-n", ns) if ns else ()
                _ip(*where, "addr", "add", addr, "dev", name)
                _ip(*where, "link", "set", name, "up")

    def prefix(self, kind: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[kind]]

    def bind_host(self, kind: str) -> str:
        return "0.0.0.0" if kind == "prefill" else f"{self.net}.10"

    def admin_address(self, kind: str, port: int) -> str:
        return f"{self.net}.6:{port}" if kind == "prefill" else f"{self.net}.10:{port}"

    def prefill_for_decode(self, port: int) -> str:
        return f"{self.net}.1:{port}"

    def set_link(self, mbit: float | None) -> None:
        tc = ["ip", "netns", "exec", self.ns["prefill"], "tc", "qdisc"]
        if mbit is None:
            subprocess.run([*tc, "del", "dev", self.link_dev, "root"], capture_output=True)
        else:
            # A burst of ~4 ms of traffic (at least 16 KiB) keeps the average exact without starving TCP.
            burst = max(16 * 1024, int(mbit * 1e6 / 8 * 0.004))
            done = subprocess.run([*tc, "replace", "dev", self.link_dev, "root", "tbf", "rate", f"{mbit}mbit",
                                   "burst", str(burst), "latency", "200ms"], capture_output=True, text=True)
            if done.returncode != 0:
                raise NetnsUnavailable(f"tc tbf on {self.link_dev} failed: {done.stderr.strip()}")
        self.mbit = mbit

    def describe(self) -> str:
        return (f"prefill and decode in network namespaces {self.ns['prefill']} / {self.ns['decode']}, "
                f"joined by a veth pair shaped with tc tbf")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in self.ns.values():  # deleting a namespace deletes its veth ends and their peers
            _ip("netns", "del", ns, check=False)
        for dev in self._root_devs:  # in case setup failed before a pair was split
            _ip("link", "del", dev, check=False)
        atexit.unregister(self.close)

    def exists(self) -> list[str]:
        """Namespaces of this link that still exist (for tests)."""
        listed = _ip("netns", "list", check=False).stdout.split()
        return [ns for ns in self.ns.values() if ns in listed]
