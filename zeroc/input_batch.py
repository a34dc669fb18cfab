"""The running sequences' batch state, kept on the device across steps (vLLM v1's persistent batch).

Row i is the engine's i-th running sequence. Its block table, context length and next input token
(the id sampled last) live in preallocated device tensors. A step changes them in place: a decode
row gains at most one block id and its length grows by one; an admitted sequence writes its row
once; rows of sequences that left are compacted away, order kept, in one gather. Nothing is rebuilt
from Python lists for a sequence that keeps running, and a decode-only step needs no host->device
copy at all except the rare new block ids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zeroc.device import host_to_device
from zeroc.kv_cache import PagedBatch


class InputBatch:
    def __init__(self, max_seqs: int, max_blocks: int, block_size: int, device: torch.device):
        self.block_size, self.device = block_size, device
        self.block_tables = torch.zeros(max_seqs, max_blocks, dtype=torch.long, device=device)  # [S, max_blocks]
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.long, device=device)  # [S] context after the last step
        self.token_ids = torch.zeros(max_seqs, dtype=torch.long, device=device)  # [S] next input token per row
        self.rows: list[str] = []  # request id of each row
        self.num_blocks: list[int] = []  # host mirror: block ids of each row already on the device
        # decode-only step constants: query i is row i
        self.arange = torch.arange(max_seqs + 1, dtype=torch.long, device=device)

    @property
    def max_seqs(self) -> int:
        return self.block_tables.shape[0]

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, request_ids: list[str]) -> None:
        """Drop the rows of sequences not in `request_ids` (which lists the remaining rows in order)."""
        if request_ids == self.rows:
            return
        where = {rid: i for i, rid in enumerate(self.rows)}
        kept = [where[rid] for rid in request_ids]  # KeyError: a sequence that never got a row
        if kept != list(range(len(kept))):
            idx = host_to_device(kept, torch.long, self.device)
            for t in (self.block_tables, self.seq_lens, self.token_ids):
                t[: len(kept)] = t.index_select(0, idx)
        self.rows = list(request_ids)
        self.num_blocks = [self.num_blocks[i] for i in kept]

    def decode(self, new_blocks: list[list[int]]) -> None:
        """Every row takes one more token: append the blocks each gained (new_blocks[i], usually none) and
        bump every length by one."""
        cells = [(row, self.num_blocks[row] + j, b) for row, grown in enumerate(new_blocks)
                 for j, b in enumerate(grown)]
        if cells:
            flat = host_to_device([x for c in cells for x in c], torch.long, self.device).view(-1, 3)
            self.block_tables[flat[:, 0], flat[:, 1]] = flat[:, 2]
            for row, grown in enumerate(new_blocks):
                self.num_blocks[row] += len(grown)
        self.seq_lens[: len(self.rows)] += 1

    def add(self, entries: list[tuple[str, list[int], int]]) -> None:
        """New rows after the existing ones: (request id, whole block table, context length after this step)."""
        if not entries:
            return
        start = len(self.rows)
        if start + len(entries) > self.max_seqs:
            raise ValueError(f"{start + len(entries)} rows; the batch holds {self.max_seqs}")
        width = max(len(t) for _, t, _ in entries)
        tables = [t + [0] * (width - len(t)) for _, t, _ in entries]
        rows = slice(start, start + len(entries))
        self.block_tables[rows, :width] = host_to_device(tables, torch.long, self.device)
        self.seq_lens[rows] = host_to_device([n for _, _, n in entries], torch.long, self.device)
        self.rows += [rid for rid, _, _ in entries]
        self.num_blocks += [len(t) for _, t, _ in entries]

    def set_tokens(self, ids: Tensor) -> None:
        """The ids sampled for the first len(ids) rows: their next input tokens. ids: [B] on the device.
        A failed row's id (sampling's FAILED, negative) becomes 0: with async scheduling that row may run one
        more step before the host knows it failed, and a negative id would fault the embedding lookup."""
        self.token_ids[: ids.shape[0]] = ids.clamp(min=0)

    def width(self) -> int:
        return max(self.num_blocks, default=1)

    def decode_slots(self, n: int, width: int | None = None, by_position: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """(positions, slot mapping, block tables) of one new token for each of the first n rows, from the
        device state alone: positions [n], slots [n] (-1 unless `by_position`: the policy's store places
        tokens, and positions may run past the table), tables [n, width]."""
        tables = self.block_tables[:n, : width or self.block_tables.shape[1]]
        pos = self.seq_lens[:n] - 1
        if not by_position:
            return pos, torch.full_like(pos, -1), tables
        slots = tables.gather(1, (pos // self.block_size).unsqueeze(1)).squeeze(1) * self.block_size \
            + pos % self.block_size
        return pos, slots, tables

    def paged_batch(self, decode_rows: int, prefill: list[tuple[list[int], list[int], list[int]]],
                    by_position: bool) -> tuple[Tensor, PagedBatch]:
        """(input tokens [N], the step's PagedBatch): the first `decode_rows` rows take one token each (their
        last sampled ids, on the device); then each prefill row (rows after them) its (tokens, positions,
        slots) from the host."""
        n_rows = decode_rows + len(prefill)
        pos, slots, _ = self.decode_slots(decode_rows, self.width(), by_position)
        tables = self.block_tables[:n_rows, : self.width()]
        tokens = self.token_ids[:decode_rows]
        if prefill:
            host = host_to_device([x for p in prefill for part in p for x in part], torch.long, self.device)
            parts, at = [], 0
            for toks, _, _ in prefill:
                n = len(toks)
                parts.append((host[at: at + n], host[at + n: at + 2 * n], host[at + 2 * n: at + 3 * n]))
                at += 3 * n
            tokens = torch.cat([tokens, *(p[0] for p in parts)])
            pos = torch.cat([pos, *(p[1] for p in parts)])
            slots = torch.cat([slots, *(p[2] for p in parts)])
            starts = list(range(decode_rows + 1))
            for toks, _, _ in prefill:
                starts.append(starts[-1] + len(toks))
            qsl = host_to_device(starts, torch.long, self.device)
        else:
            qsl = self.arange[: n_rows + 1]
        lens = [1] * decode_rows + [len(toks) for toks, _, _ in prefill]
        first_positions = (None,) * decode_rows + tuple(at[0] for _, at, _ in prefill)
        batch = PagedBatch(positions=pos, slot_mapping=slots, block_tables=tables, seq_lens=self.seq_lens[:n_rows],
                           query_start_loc=qsl, last_token_indices=qsl[1:] - 1, max_query_len=max(lens),
                           starts=first_positions, query_lens=tuple(lens))
        return tokens, batch

    def snapshot(self) -> list[tuple[str, list[int], int]]:
        """The rows as host lists (request id, block table, length), for checks against a rebuild."""
        tables, lens = self.block_tables[: len(self.rows)].tolist(), self.seq_lens[: len(self.rows)].tolist()
        return [(rid, t[:n], ln) for rid, t, n, ln in zip(self.rows, tables, self.num_blocks, lens)]
