"""The block index: which holder (service address) has which block, in Redis.

Key schema (all keys share the hash tag ``{ns}`` so a Redis Cluster keeps them in one slot and
the Lua scripts stay atomic; see docs/kv_store.md):

- ``{ns}:lease:<holder>``  string with a PX expiry: the holder's lease. Renewed every lease/3;
  when it expires every entry of that holder is dead at once (lookups skip and delete them).
- ``{ns}:holders``          set of holders that registered (the reaper walks it).
- ``{ns}:blk:<block id>``   hash: field = holder, value = JSON ``{"tier","bytes","crc","ref"}``.
- ``{ns}:lru:<holder>``     sorted set: block id -> last use (Redis server time, ms). The
  holder's blocks in LRU order; the reaper uses it to find a dead holder's entries.

Every multi-key update is one Lua script, so readers never see half of one.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass

import redis

from kv_store.embedded import connect


class IndexUnavailable(RuntimeError):
    """Redis did not answer (down, unreachable, timed out); the caller degrades to no reuse."""


class LeaseLostError(IndexUnavailable):
    """The holder's lease is gone (it expired, or Redis restarted empty): register and resync."""


@dataclass(frozen=True)
class BlockEntry:
    """What a holder publishes for one block it stores."""

    block_id: str
    tier: str  # where the data lives: "cpu" or "gpu"
    nbytes: int  # payload bytes of the block, all layers, K and V
    checksum: int  # CRC32C of the payload
    refcount: int = 0  # requests using the block on its holder now (local readers and peer fetches)


@dataclass(frozen=True)
class Holding:
    """One live holder of a block, as `lookup` reports it."""

    holder: str
    tier: str
    nbytes: int
    checksum: int
    refcount: int
    lease_expiry: float  # unix time at which the entry dies unless its holder renews


class BlockIndex(abc.ABC):
    """Where blocks are held. Holders call `register`, `put`, `remove`, `set_refcounts`, `touch`,
    `held_by` and `reap`; readers (any service looking up a prompt) call `lookup`. Every method
    raises IndexUnavailable when the index cannot be reached."""

    @abc.abstractmethod
    def register(self, holder: str, lease_s: float) -> None:
        """Start or renew `holder`'s lease."""

    @abc.abstractmethod
    def renew(self, holder: str, lease_s: float) -> bool:
        """Extend `holder`'s lease; False (changing nothing) if it is gone: expired, so its entries may
        have been reaped, or Redis restarted empty. The holder must then register and republish."""

    @abc.abstractmethod
    def put(self, holder: str, entries: list[BlockEntry]) -> None:
        """Publish blocks whose data the holder already stores (phase two of a put). Raises
        LeaseLostError, writing nothing, if the holder's lease is gone."""

    @abc.abstractmethod
    def remove(self, holder: str, block_ids: list[str]) -> None:
        """Withdraw blocks; called before their data is dropped."""

    @abc.abstractmethod
    def set_refcounts(self, holder: str, refcounts: dict[str, int]) -> None:
        """Record how many requests use each block now (entries that are gone are skipped)."""

    @abc.abstractmethod
    def touch(self, holder: str, block_ids: list[str]) -> None:
        """Mark blocks as just used (LRU order)."""

    @abc.abstractmethod
    def lookup(self, block_ids: list[str]) -> list[list[Holding]]:
        """Live holders of each block of a chain, for the longest prefix that has any."""

    @abc.abstractmethod
    def held_by(self, holder: str) -> list[str]:
        """Block ids the index lists for `holder`, least recently used first."""

    @abc.abstractmethod
    def reap(self) -> int:
        """Delete every entry of holders whose lease expired; returns how many holders were reaped."""

    @abc.abstractmethod
    def withdraw(self, holder: str) -> None:
        """End `holder`'s lease and delete all its entries (a graceful shutdown)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise IndexUnavailable unless the index answers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# ARGV: prefix, holder, then (block id, entry JSON) pairs. -1 if the lease is gone.
_PUT = _NOW + """
local p, holder = ARGV[1], ARGV[2]
if redis.call('PTTL', p .. 'lease:' .. holder) <= 0 then return -1 end
for i = 3, #ARGV, 2 do
  redis.call('HSET', p .. 'blk:' .. ARGV[i], holder, ARGV[i + 1])
  redis.call('ZADD', p .. 'lru:' .. holder, now, ARGV[i])
end
return (#ARGV - 2) / 2
"""

# ARGV: prefix, holder, block ids...
_REMOVE = """
local p, holder = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  redis.call('HDEL', p .. 'blk:' .. ARGV[i], holder)
  redis.call('ZREM', p .. 'lru:' .. holder, ARGV[i])
end
return #ARGV - 2
"""

# ARGV: prefix, holder, then (block id, refcount) pairs.
_REFCOUNTS = """
local p, holder = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  local key = p .. 'blk:' .. ARGV[i]
  local raw = redis.call('HGET', key, holder)
  if raw then
    local e = cjson.decode(raw)
    e['ref'] = tonumber(ARGV[i + 1])
    redis.call('HSET', key, holder, cjson.encode(e))
  end
end
return 1
"""

# ARGV: prefix, holder, block ids... (only blocks still listed get a new score)
_TOUCH = _NOW + """
local p, holder = ARGV[1], ARGV[2]
for i = 3, #ARGV do redis.call('ZADD', p .. 'lru:' .. holder, 'XX', now, ARGV[i]) end
return 1
"""

# ARGV: prefix, block ids... -> one JSON string: per block of the longest live prefix, a list of
# {"h": holder, "e": entry, "t": lease ms left}. One bulk string instead of a nested reply: parsing
# hundreds of RESP elements in the Python client cost ten times the script itself.
# Fields of holders whose lease is gone are deleted on the way, so nobody is pointed at them again.
_LOOKUP = """
local p = ARGV[1]
local ttl = {}
local out = {}
for i = 2, #ARGV do
  local key = p .. 'blk:' .. ARGV[i]
  local fields = redis.call('HGETALL', key)
  local live = {}
  for j = 1, #fields, 2 do
    local holder = fields[j]
    if ttl[holder] == nil then ttl[holder] = redis.call('PTTL', p .. 'lease:' .. holder) end
    if ttl[holder] > 0 then  -- entries are JSON already: splice them in rather than decode and re-encode
      live[#live + 1] = '{"h":' .. cjson.encode(holder) .. ',"e":' .. fields[j + 1] .. ',"t":' .. ttl[holder] .. '}'
    else
      redis.call('HDEL', key, holder)
    end
  end
  if #live == 0 then break end
  out[#out + 1] = '[' .. table.concat(live, ',') .. ']'
end
return '[' .. table.concat(out, ',') .. ']'
"""

# ARGV: prefix[, holder]. Holders without a lease (or the one named: a withdrawal) lose every entry
# their LRU set lists.
_REAP = """
local p = ARGV[1]
local reaped = 0
if ARGV[2] then redis.call('DEL', p .. 'lease:' .. ARGV[2]) end
for _, holder in ipairs(redis.call('SMEMBERS', p .. 'holders')) do
  if redis.call('EXISTS', p .. 'lease:' .. holder) == 0 then
    for _, id in ipairs(redis.call('ZRANGE', p .. 'lru:' .. holder, 0, -1)) do
      redis.call('HDEL', p .. 'blk:' .. id, holder)
    end
    redis.call('DEL', p .. 'lru:' .. holder)
    redis.call('SREM', p .. 'holders', holder)
    reaped = reaped + 1
  end
end
return reaped
"""

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError, OSError)


class RedisBlockIndex(BlockIndex):
    """The index in one Redis (a single server, a Sentinel-managed master, or a Cluster slot)."""

    def __init__(self, url: str, namespace: str = "zeroc", timeout_s: float = 0.5):
        self.client = connect(url, timeout_s)
        self.prefix = f"{{{namespace}}}:"
        self._route = [f"{self.prefix}holders"]  # the key that routes every script to the namespace's slot
        scripts = {"put": _PUT, "remove": _REMOVE, "refs": _REFCOUNTS, "touch": _TOUCH, "lookup": _LOOKUP,
                   "reap": _REAP}
        self._scripts = {name: self.client.register_script(src) for name, src in scripts.items()}

    def _run(self, name: str, *args):
        try:
            return self._scripts[name](keys=self._route, args=[self.prefix, *args])
        except _REDIS_DOWN as exc:
            raise IndexUnavailable(f"redis: {exc}") from None

    def register(self, holder: str, lease_s: float) -> None:
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(f"{self.prefix}lease:{holder}", "1", px=max(1, int(lease_s * 1000)))
                pipe.sadd(f"{self.prefix}holders", holder)
                pipe.execute()
        except _REDIS_DOWN as exc:
            raise IndexUnavailable(f"redis: {exc}") from None

    def renew(self, holder: str, lease_s: float) -> bool:
        try:
            return bool(self.client.pexpire(f"{self.prefix}lease:{holder}", max(1, int(lease_s * 1000))))
        except _REDIS_DOWN as exc:
            raise IndexUnavailable(f"redis: {exc}") from None

    def put(self, holder: str, entries: list[BlockEntry]) -> None:
        if not entries:
            return
        args = [holder]
        for e in entries:
            args += [e.block_id, json.dumps({"tier": e.tier, "bytes": e.nbytes, "crc": e.checksum,
                                             "ref": e.refcount}, separators=(",", ":"))]
        if self._run("put", *args) == -1:
            raise LeaseLostError(f"holder {holder} has no lease")

    def remove(self, holder: str, block_ids: list[str]) -> None:
        if block_ids:
            self._run("remove", holder, *block_ids)

    def set_refcounts(self, holder: str, refcounts: dict[str, int]) -> None:
        if refcounts:
            self._run("refs", holder, *[x for item in refcounts.items() for x in item])

    def touch(self, holder: str, block_ids: list[str]) -> None:
        if block_ids:
            self._run("touch", holder, *block_ids)

    def lookup(self, block_ids: list[str]) -> list[list[Holding]]:
        if not block_ids:
            return []
        now = time.time()
        return [[Holding(x["h"], x["e"]["tier"], int(x["e"]["bytes"]), int(x["e"]["crc"]), int(x["e"]["ref"]),
                         now + x["t"] / 1000) for x in live]
                for live in json.loads(self._run("lookup", *block_ids))]

    def held_by(self, holder: str) -> list[str]:
        try:
            return [b.decode() for b in self.client.zrange(f"{self.prefix}lru:{holder}", 0, -1)]
        except _REDIS_DOWN as exc:
            raise IndexUnavailable(f"redis: {exc}") from None

    def reap(self) -> int:
        return int(self._run("reap"))

    def withdraw(self, holder: str) -> None:
        self._run("reap", holder)

    def ping(self) -> None:
        try:
            self.client.ping()
        except _REDIS_DOWN as exc:
            raise IndexUnavailable(f"redis: {exc}") from None

    def close(self) -> None:
        self.client.close()
