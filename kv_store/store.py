"""The KV store as services use it: look up a prompt's cached prefix, load it, offer new blocks.

One `KvStore` per holder (a prefill or decode service). Request threads call `plan` and `load`;
the engine thread calls `offer` after a prompt's KV is computed, which only copies blocks out of
the paged cache: a writer thread stores them in the pool (evicting LRU blocks: index entry
withdrawn first, data dropped after) and publishes them in the index (data first, entry after),
so the engine never waits on Redis.

When Redis cannot be reached the store degrades: lookups use the local pool only, index writes
are skipped, the state turns "degraded" (health, logs, `index_errors`). A lease thread renews the
holder's lease while healthy and pings Redis while degraded; once it answers, the writer
re-registers and reconciles (withdraws entries of blocks no longer held, republishes the rest), so
a Redis that restarted empty is refilled.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from kv_store.hashing import block_ids
from kv_store.index import BlockEntry, BlockIndex, IndexUnavailable
from kv_store.integrity import block_mac, verified_prefix
from kv_store.peer import PeerFetcher
from kv_store.pool import BlockPool
from zeroc.config import KvStoreConfig
from zeroc.kv_cache import PagedKVCache
from zeroc.kv_transfer import KvReceiver, KvTransferError
from zeroc.security import TenantKeys

log = logging.getLogger(__name__)
_STOP = object()


@dataclass(frozen=True)
class PrefixPlan:
    """Where each block of a prompt's reusable prefix comes from."""

    block_ids: list[str]
    sources: list[str | None]  # per block: None = the local pool, else the peer holding it
    checksums: list[int]  # per block: the index's CRC32C (0 for local blocks)
    block_size: int

    @property
    def tokens(self) -> int:
        return len(self.block_ids) * self.block_size


@dataclass(frozen=True)
class LoadResult:
    """What `load` put into a request's cache slots."""

    tokens: int  # leading prompt tokens whose KV is now in place
    local_blocks: int
    peer_blocks: int
    peer_bytes: int


@dataclass(frozen=True)
class StoreStats:
    state: str  # "starting" | "ok" | "degraded"
    index: str
    holder: str
    blocks_held: int
    capacity_blocks: int
    lookups: int
    hit_tokens: int
    peer_blocks: int
    index_errors: int
    reconnects: int
    evictions: int
    peer_bytes: int = 0  # KV payload bytes fetched from peers


@dataclass
class _Counters:
    lookups: int = 0
    hit_tokens: int = 0
    peer_blocks: int = 0
    index_errors: int = 0
    reconnects: int = 0
    evictions: int = 0
    rejected_blocks: int = 0  # blocks from peers whose MAC did not check out
    peer_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)


class KvStore:
    """One holder's store. Request threads call `plan` and `load`; the engine (or prefill worker)
    thread calls `offer`; the FetchBlocks servicer calls `served` and `pins_changed`; the service
    calls `stats` and, at shutdown, `close`."""

    def __init__(self, pool: BlockPool, index: BlockIndex, holder: str, seed: str, cfg: KvStoreConfig,
                 retry_s: float, fetcher: PeerFetcher | None, index_name: str = "",
                 on_state: Callable[[str], None] = lambda state: None, keys: TenantKeys | None = None,
                 mac_key: bytes | None = None):
        self.pool, self.index, self.holder, self.seed, self.cfg = pool, index, holder, seed, cfg
        # Block ids are keyed per tenant: without keys of its own the store shares ids with nobody.
        self.keys = keys or TenantKeys(secrets.token_bytes(32))
        # Blocks from peers are used only if their MAC under this key checks out (kv_store.integrity).
        self.mac_key = mac_key or secrets.token_bytes(32)
        self.fetcher, self.index_name, self.on_state = fetcher, index_name, on_state
        self.retry_s = retry_s
        self.counters = _Counters()
        self.state = "starting"  # "ok" once registered, "degraded" while Redis cannot be reached
        self._connected_once = False
        self._state_lock = threading.Lock()
        self._ops: queue.Queue = queue.Queue(maxsize=256)
        # Blocks offered and not yet stored by the writer: a lookup waits for these (briefly, cfg.settle_ms) rather
        # than compute them again; `_stored` wakes it.
        self._storing: set[str] = set()
        self._stored = threading.Condition()
        self._reconcile_queued = threading.Event()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer", daemon=True)
        self._lease = threading.Thread(target=self._lease_loop, name="kv-store-lease", daemon=True)
        self._queue_reconcile()
        self._writer.start()
        self._lease.start()

    # -- request threads ------------------------------------------------------------------------
    def block_ids(self, token_ids: list[int], tenant: str = "") -> list[str]:
        """The ids of `token_ids`' full blocks in `tenant`'s cache (empty: the default tenant)."""
        return block_ids(token_ids, self.pool.block_size, self.seed, self.keys.key(tenant))

    def plan(self, token_ids: list[int], tenant: str = "") -> PrefixPlan:
        """The longest prefix of full blocks of `token_ids` in `tenant`'s cache held locally or by a live peer."""
        ids = self.block_ids(token_ids, tenant)
        self.counters.add(lookups=1)
        local = self._settled_prefix(ids)
        holdings = [[]] * local  # only blocks past the local prefix are looked up
        if local < len(ids) and self.state == "ok" and self.fetcher is not None:
            try:
                holdings += self.index.lookup(ids[local:])
            except IndexUnavailable as exc:
                self._degrade(exc)
        sources: list[str | None] = []
        checksums: list[int] = []
        prev = None
        for i, b in enumerate(ids):
            if self.pool.holds(b):
                sources.append(None)
                checksums.append(0)
                prev = None
                continue
            peers = [h for h in (holdings[i] if i < len(holdings) else []) if h.holder != self.holder]
            if not peers:
                break
            # Stay with the previous block's peer (one stream per run); else the least busy holder.
            pick = next((h for h in peers if h.holder == prev), None) or min(peers, key=lambda h: h.refcount)
            sources.append(pick.holder)
            checksums.append(pick.checksum)
            prev = pick.holder
        n = len(sources)
        return PrefixPlan(ids[:n], sources, checksums, self.pool.block_size)

    def _settled_prefix(self, ids: list[str]) -> int:
        """How many leading blocks of `ids` are held here, once those of them being stored (offered moments ago: a
        request's other choices follow its first with the same prompt) have landed, waiting at most settle_ms."""
        def pending(n: int) -> bool:  # the first block not held is one the writer is storing
            return n < len(ids) and ids[n] in self._storing

        n = self.pool.held_prefix(ids)
        if not pending(n):  # the usual case: a set lookup, no lock
            return n
        with self._stored:  # woken by `_landed`
            self._stored.wait_for(lambda: not pending(self.pool.held_prefix(ids)), timeout=self.cfg.settle_ms / 1000)
        return self.pool.held_prefix(ids)

    def load(self, plan: PrefixPlan, cache: PagedKVCache, slots: Tensor) -> LoadResult:
        """Put the plan's blocks into a request's reserved slots (slots: [>= plan.tokens], from position 0).

        Stops at the first block that cannot be had (evicted meanwhile, peer gone): the result says
        how many leading tokens are in place, and the caller computes the rest."""
        bs = self.pool.block_size
        done = local = peer = peer_bytes = 0
        n = len(plan.block_ids)
        while done < n:
            src = plan.sources[done]
            end = done
            while end < n and plan.sources[end] == src:
                end += 1
            ids = plan.block_ids[done:end]
            if src is None:
                dest = [int(slots[b * bs]) // bs for b in range(done, end)]
                got = self.pool.copy_into(ids, cache, dest)
                local += got
            else:
                got, nbytes = self._fetch(src, ids, plan.checksums[done:end], cache, slots, done)
                peer, peer_bytes = peer + got, peer_bytes + nbytes
            if got:
                self._queue(("touch", ids[:got]))
            done += got
            if got < len(ids):
                break
        self.counters.add(hit_tokens=done * bs, peer_blocks=peer, peer_bytes=peer_bytes)
        return LoadResult(done * bs, local, peer, peer_bytes)

    def _fetch(self, peer: str, ids: list[str], checksums: list[int], cache: PagedKVCache, slots: Tensor,
               first_block: int) -> tuple[int, int]:
        """Fetch blocks from `peer` into the request's slots; returns (blocks landed and verified, bytes)."""
        bs = self.pool.block_size
        first = first_block * bs
        try:
            got, nbytes, macs = self.fetcher.fetch(
                peer, ids, checksums, lambda m: KvReceiver(cache, slots[first:first + m * bs], start=first),
                first, self.cfg.fetch_timeout_s)
        except KvTransferError as exc:
            # A dead or lagging peer costs only the reuse: the caller recomputes these blocks.
            log.warning("peer fetch failed; recomputing", extra={"peer": peer, "code": exc.code.name,
                                                                  "error": str(exc)})
            return 0, 0
        dest = [int(slots[first + i * bs]) // bs for i in range(got)]
        ok = verified_prefix(self.mac_key, ids[:got], macs, cache.k_pools, cache.v_pools, dest)
        if ok < got:
            # Not made by a service of this deployment (a forged index entry, a rogue holder): the
            # caller recomputes from here, overwriting what landed, and nothing of it is kept.
            self.counters.add(rejected_blocks=got - ok)
            log.warning("peer served blocks failing their MAC; recomputing them",
                        extra={"peer": peer, "rejected": got - ok})
        return ok, nbytes if ok == got else nbytes * ok // max(got, 1)

    # -- the engine thread ----------------------------------------------------------------------
    def offer(self, token_ids: list[int], cache: PagedKVCache, block_table: list[int], tenant: str = "") -> None:
        """A sequence's KV for `token_ids` is in `cache` at `block_table`: keep its full blocks (in `tenant`'s cache).

        Copies the blocks the pool lacks and returns; the writer thread stores and publishes them."""
        ids = self.block_ids(token_ids, tenant)
        new = [i for i, b in enumerate(ids) if not self.pool.holds(b)]
        if not new:
            if ids:
                self._queue(("touch", ids))
            return
        k, v = cache.read_blocks([block_table[i] for i in new])  # per layer: [len(new), block_size, kv_heads, dim]
        put = [ids[i] for i in new]
        with self._stored:
            self._storing.update(put)
        if not self._queue(("put", put, k, v)):
            self._landed(put)

    # -- peers ---------------------------------------------------------------------------------------
    def served(self, ids: list[str]) -> None:
        """FetchBlocks served these blocks (LRU)."""
        self._queue(("touch", ids))

    def pins_changed(self, ids: list[str]) -> None:
        """Pins of these blocks changed: mirror their refcounts to the index."""
        self._queue(("refs", ids))

    # -- state -----------------------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        c = self.counters
        with c.lock:
            return StoreStats(self.state, self.index_name, self.holder, len(self.pool), self.pool.capacity,
                              c.lookups, c.hit_tokens, c.peer_blocks, c.index_errors, c.reconnects, c.evictions,
                              c.peer_bytes)

    def _set_state(self, state: str) -> bool:
        with self._state_lock:
            changed, self.state = self.state != state, state
        if changed:
            self.on_state(state)
        return changed

    def _degrade(self, exc: Exception) -> None:
        self.counters.add(index_errors=1)
        if self._set_state("degraded"):
            log.warning("kv store index unavailable; serving without cross-service prefix reuse until it is back",
                        extra={"index": self.index_name, "error": str(exc)})

    def _queue(self, op: tuple) -> bool:
        try:
            self._ops.put_nowait(op)
            return True
        except queue.Full:  # the writer is behind (a slow index): drop the op, reuse is an optimisation
            log.debug("kv store writer behind; dropped an op", extra={"op": op[0]})
            return False

    def _landed(self, ids: list[str]) -> None:
        """These offered blocks are stored (or will not be): lookups waiting on them go on."""
        with self._stored:
            self._storing.difference_update(ids)
            self._stored.notify_all()

    def _queue_reconcile(self) -> None:
        if not self._reconcile_queued.is_set():
            self._reconcile_queued.set()
            self._ops.put(("reconcile",))

    # -- the writer thread -------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while (op := self._ops.get()) is not _STOP:
            try:
                if op[0] == "put":
                    try:
                        self._put(*op[1:])
                    finally:
                        self._landed(op[1])
                elif op[0] == "reconcile":
                    self._reconcile()
                elif self.state == "ok" and op[0] == "touch":
                    self.index.touch(self.holder, op[1])
                elif self.state == "ok" and op[0] == "refs":
                    self.index.set_refcounts(self.holder, {b: self.pool.refcount(b) for b in op[1]})
            except IndexUnavailable as exc:
                self._degrade(exc)
            except Exception:  # a bug here must not stop the writer: the service keeps serving
                log.exception("kv store writer op failed", extra={"op": op[0]})

    def _put(self, ids: list[str], k: list[Tensor], v: list[Tensor]) -> None:
        pool = self.pool
        pool.touch_chain(ids)  # the chain's blocks already held must not be the victims that make room
        short = sum(not pool.holds(b) for b in ids) - pool.num_free
        if short > 0:
            victims = pool.take_victims(short)
            try:
                if self.state == "ok" and victims:
                    self.index.remove(self.holder, victims)  # entry withdrawn before the data goes
            finally:
                pool.release(victims)  # if Redis failed, the reconcile after reconnecting withdraws them
                self.counters.add(evictions=len(victims))
        entries = []
        for i, b in enumerate(ids):
            if pool.holds(b) or pool.num_free == 0:  # no room left: every other block is pinned
                continue
            kb, vb = [t[i] for t in k], [t[i] for t in v]
            crc = pool.insert(b, kb, vb, block_mac(self.mac_key, b, kb, vb))
            entries.append(BlockEntry(b, pool.tier, pool.block_bytes, crc))
        pool.touch_chain(ids)
        self._landed(ids)  # held here now: local lookups need not wait for the index
        if self.state == "ok":
            self.index.put(self.holder, entries)

    def _reconcile(self) -> None:
        """Register, withdraw listed blocks that are not held, publish every held block."""
        self._reconcile_queued.clear()
        self.index.register(self.holder, self.cfg.lease_s)
        with self.pool.lock:  # no eviction or insert can interleave (this thread is the only writer)
            held = self.pool.visible_ids()
        stale = sorted(set(self.index.held_by(self.holder)) - set(held))
        self.index.remove(self.holder, stale)
        self.index.put(self.holder, [BlockEntry(b, self.pool.tier, self.pool.block_bytes, self.pool.checksum(b),
                                                self.pool.refcount(b)) for b in held if self.pool.holds(b)])
        if self._set_state("ok"):
            if self._connected_once:
                self.counters.add(reconnects=1)
            self._connected_once = True
            log.info("kv store index connected", extra={"index": self.index_name, "holder": self.holder,
                                                        "blocks": len(held), "withdrawn": len(stale)})

    # -- the lease thread ------------------------------------------------------------------------------
    def _lease_loop(self) -> None:
        renew_s = self.cfg.lease_s / 3
        while not self._stop.wait(renew_s if self.state == "ok" else self.retry_s):
            try:
                if self.state == "ok":
                    if not self.index.renew(self.holder, self.cfg.lease_s):
                        self._lease_lost()
                        continue
                    self.index.reap()
                else:
                    self.index.ping()
                    self._queue_reconcile()
            except IndexUnavailable as exc:
                if self.state == "ok":
                    self._degrade(exc)

    def _lease_lost(self) -> None:
        """The lease ran out (this process stalled past it, or Redis lost it): the index may list none of
        our blocks. Degraded until the writer has registered and republished them (`_reconcile`)."""
        self.counters.add(index_errors=1)
        if self._set_state("degraded"):
            log.warning("kv store lease lost; re-registering and republishing", extra={"holder": self.holder})
        self._queue_reconcile()

    def close(self, withdraw: bool = True) -> None:
        """Stop the threads; `withdraw` removes this holder's entries and lease (a graceful exit)."""
        self._stop.set()
        self._ops.put(_STOP)
        self._writer.join(timeout=10)
        self._lease.join(timeout=10)
        if withdraw and self.state == "ok":
            try:
                self.index.withdraw(self.holder)
            except IndexUnavailable:
                pass  # the lease runs out instead
        self.index.close()
        if self.fetcher is not None:
            self.fetcher.close()
