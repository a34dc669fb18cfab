"""A holder's block data: per-layer K and V tensors of a fixed number of blocks, LRU-ordered.

Blocks are whole paged-cache blocks (same block size), so moving one between the pool and a
request's cache blocks is one indexed copy per layer. Pinned blocks (in use by a request or a
peer fetch) are never chosen for eviction. Eviction is two calls so the caller can withdraw the
index entries in between: `take_victims` hides blocks from new readers (their data stays),
`release` frees their slots. All methods are thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import google_crc32c
import torch
from torch import Tensor

from zeroc.kv_cache import LayerShape, PagedKVCache


class BlockPool:
    def __init__(self, shapes: list[LayerShape], block_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if capacity <= 0:
            raise ValueError(f"a block pool needs capacity >= 1, got {capacity}")
        self.block_size, self.capacity = block_size, capacity
        device = torch.device(device)
        self.tier = "gpu" if device.type == "cuda" else "cpu"
        # k[layer]: [capacity, block_size, kv_heads, k_dim]; v[layer] likewise with v_dim. Uninitialised:
        # a slot is only read after `insert` wrote it, and untouched pages of a big pool cost no memory.
        self.k = [torch.empty(capacity, block_size, s.kv_heads, s.k_dim, dtype=dtype, device=device) for s in shapes]
        self.v = [torch.empty(capacity, block_size, s.kv_heads, s.v_dim, dtype=dtype, device=device) for s in shapes]
        self.block_bytes = sum(t[0].numel() * t.element_size() for t in (*self.k, *self.v))
        self.lock = threading.RLock()
        self._slots: OrderedDict[str, int] = OrderedDict()  # visible blocks, least recently used first
        self._evicting: dict[str, int] = {}  # taken by take_victims: hidden, data kept until release
        self._pins: dict[str, int] = {}
        self._macs: dict[str, bytes] = {}  # per stored block: its MAC (kv_store.integrity)
        self._free = list(range(capacity - 1, -1, -1))

    @staticmethod
    def blocks_for(shapes: list[LayerShape], block_size: int, dtype: torch.dtype, capacity_mb: int) -> int:
        """How many blocks of this geometry fit `capacity_mb` MiB."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_block = block_size * itemsize * sum(s.kv_heads * (s.k_dim + s.v_dim) for s in shapes)
        return (capacity_mb << 20) // per_block

    # -- queries ---------------------------------------------------------------------------------
    def holds(self, block_id: str) -> bool:
        with self.lock:
            return block_id in self._slots

    def held_prefix(self, block_ids: list[str]) -> int:
        """How many leading blocks of a chain are here."""
        with self.lock:
            n = 0
            while n < len(block_ids) and block_ids[n] in self._slots:
                n += 1
            return n

    def stored_ids(self) -> set[str]:
        """Every block whose data is here, including blocks being evicted (their entries may still be listed)."""
        with self.lock:
            return set(self._slots) | set(self._evicting)

    def visible_ids(self) -> list[str]:
        with self.lock:
            return list(self._slots)

    def refcount(self, block_id: str) -> int:
        with self.lock:
            return self._pins.get(block_id, 0)

    @property
    def num_free(self) -> int:
        with self.lock:
            return len(self._free)

    def __len__(self) -> int:
        with self.lock:
            return len(self._slots)

    # -- readers -----------------------------------------------------------------------------------
    def pin(self, block_ids: list[str]) -> int:
        """Pin the longest held prefix of `block_ids` (marking it used); returns how many blocks."""
        with self.lock:
            n = self.held_prefix(block_ids)
            for b in block_ids[:n]:
                self._pins[b] = self._pins.get(b, 0) + 1
            self.touch_chain(block_ids[:n])
            return n

    def unpin(self, block_ids: list[str]) -> None:
        with self.lock:
            for b in block_ids:
                left = self._pins.get(b, 0) - 1
                if left < 0:
                    raise ValueError(f"block {b} unpinned more often than pinned")
                if left:
                    self._pins[b] = left
                else:
                    self._pins.pop(b, None)

    def read_layer(self, block_ids: list[str], layer: int) -> tuple[Tensor, Tensor]:
        """A copy of pinned blocks' K and V of one layer, as token rows: [n * block_size, kv_heads, dim] each."""
        with self.lock:
            idx = torch.tensor([self._slots[b] for b in block_ids], dtype=torch.long, device=self.k[0].device)
            k, v = self.k[layer][idx], self.v[layer][idx]
        return k.flatten(0, 1), v.flatten(0, 1)

    def copy_into(self, block_ids: list[str], cache: PagedKVCache, dest_blocks: list[int]) -> int:
        """Copy the longest held prefix of `block_ids` into the paged cache's blocks `dest_blocks` (through
        its KV-write seam); returns how many."""
        with self.lock:
            n = self.held_prefix(block_ids)
            if n:
                src = torch.tensor([self._slots[b] for b in block_ids[:n]], dtype=torch.long, device=self.k[0].device)
                cache.write_blocks(dest_blocks[:n], [k[src] for k in self.k], [v[src] for v in self.v])
                self.touch_chain(block_ids[:n])
            return n

    def touch_chain(self, block_ids: list[str]) -> None:
        """Mark a chain's blocks used, the head most recently: a chain is evicted from its tail, since
        a block is only reusable while every block before it is held."""
        with self.lock:
            for b in reversed(block_ids):
                if b in self._slots:
                    self._slots.move_to_end(b)

    # -- the writer (one thread) --------------------------------------------------------------------
    def take_victims(self, n: int) -> list[str]:
        """Hide up to `n` least recently used unpinned blocks from readers; their data stays until `release`."""
        with self.lock:
            victims = [b for b in self._slots if b not in self._pins][:n]
            for b in victims:
                self._evicting[b] = self._slots.pop(b)
            return victims

    def release(self, block_ids: list[str]) -> None:
        """Free the slots of blocks taken by `take_victims`."""
        with self.lock:
            for b in block_ids:
                self._free.append(self._evicting.pop(b))
                self._macs.pop(b, None)

    def insert(self, block_id: str, k: list[Tensor], v: list[Tensor], mac: bytes = b"") -> int:
        """Store one block (k[layer]: [block_size, kv_heads, k_dim]; v likewise) and its MAC; returns its CRC32C.

        Needs a free slot (`num_free` > 0); a block already held is only marked used."""
        with self.lock:
            if block_id in self._slots:
                self._slots.move_to_end(block_id)
                return self.checksum(block_id)
            if not self._free:
                raise RuntimeError("block pool is full; evict first")
            slot = self._free.pop()
            for layer in range(len(self.k)):
                self.k[layer][slot] = k[layer]
                self.v[layer][slot] = v[layer]
            self._slots[block_id] = slot
            self._macs[block_id] = mac
            return self.checksum(block_id)

    def mac(self, block_id: str) -> bytes:
        with self.lock:
            return self._macs.get(block_id, b"")

    def checksum(self, block_id: str) -> int:
        """CRC32C over the block's bytes, layer by layer, K then V."""
        with self.lock:
            slot = self._slots[block_id]
            crc = 0
            for layer in range(len(self.k)):
                for t in (self.k[layer][slot], self.v[layer][slot]):
                    crc = google_crc32c.extend(crc, t.contiguous().cpu().view(torch.uint8).numpy().tobytes())
            return crc
