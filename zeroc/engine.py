"""The generation engine: continuous batching over the paged KV cache.

Each `step()` runs one forward over a ragged batch: one new token for every running
sequence plus the whole prompt of every sequence admitted this step. Sequences join when
their blocks fit and leave (freeing their blocks) the step they finish or are aborted.
When the cache runs out during decode, the sequence that arrived last (of the highest priority value under the
priority policy; zeroc/scheduling.py) is preempted: its blocks are freed and it is recomputed later from its prompt
plus the tokens it already produced.

With `scheduler.async_scheduling` (by default on CUDA: `runs_ahead`) a step is launched before the previous
step's sampled ids reach the host: `step()` schedules and launches step n (its decode rows read their input
ids from the device), then waits for step n-1's ids and does its host work (stop checks, detokenization)
while the device runs step n, and returns step n-1's outputs. The scheduler therefore runs one step ahead of what it
knows: a sequence that step n-1 finishes on a stop token or string still has a row in step n, whose
token is discarded; one that step n-1 finishes by length is known in advance and gets no row. Blocks of
a sequence that leaves while a step holding its row is in flight are freed once that step has run, so
a later step (or a KV transfer on another stream) never reuses them under it. Where the scheduler needs
the previous step's results (the cache cannot take one more token per running sequence, so someone may
be preempted), it waits for them first: that step runs as in the synchronous mode. So does a step holding a guided
or speculating row (zeroc/speculative.py), whose next input the host must know.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor

from zeroc_kernels.attention import CpuBackend
from zeroc.config import CacheConfig, SchedulerConfig, ZeroCError
from zeroc.decode_runner import DecodeRunner, graphs_supported
from zeroc.device import DeviceToHost, host_to_device
from zeroc.caches import paged_cache
from zeroc.input_batch import InputBatch
from zeroc.kv_cache import layer_shapes
from zeroc.loader import LoadedModel
from zeroc.model import compile_feed_forward
from zeroc.penalties import PenaltyBatch, PenaltyState, ban_tokens
from zeroc.prompt_logprobs import PromptLogprobs, PromptRows
from zeroc.sampling import (FAILED, SamplingBatch, SamplingParams, TokenLogprobs, make_generator, read_logprobs,
                            sample_batch, with_logprobs)
from zeroc.scheduling import admit, holders, preemption_victim
from zeroc.sequence import GenerationResult, LaunchedStep, Results, Sequence, StepOutput
from zeroc.speculative import NgramProposer, SpecStats, accept, draft_sampling, eligible, marks, rewind
from zeroc.step_clock import NullClock
from zeroc.structured import GuideCompiler
from zeroc.tokenizer import IncrementalDetokenizer


class PromptTooLongError(ZeroCError):
    """The prompt does not fit the model's context or the whole KV cache."""


def runs_ahead(sched: SchedulerConfig, device: torch.device) -> bool:
    """Whether an engine launches each step before the previous step's ids reach the host: as configured
    (`scheduler.async_scheduling`), or where that is None, on CUDA, where the host's work per step would
    otherwise hold up the device (on the CPU, which runs ops synchronously, it overlaps nothing)."""
    return device.type == "cuda" if sched.async_scheduling is None else sched.async_scheduling


_CHUNK = SamplingParams()  # what a chunk-of-a-prompt row "samples" with: greedy, no generator; discarded


class Engine:
    def __init__(self, loaded: LoadedModel, cache: CacheConfig | None = None,
                 scheduler: SchedulerConfig | None = None, release_weights: bool = False):
        """`release_weights`: hold each GEMM's weight once, dropping the plain copies of those the backend packed
        (the cpu backend: `Transformer.release_plain_weights`), as the services do, whose process owns its model.
        Off, the model's weights stay readable as they were, for callers that go on using the model."""
        self.loaded = loaded
        self.model, self.tokenizer, self.model_config = loaded.model, loaded.tokenizer, loaded.config
        self.sched = scheduler or SchedulerConfig()
        device = next(self.model.parameters()).device
        self.runs_ahead = runs_ahead(self.sched, device)  # launch step n before step n-1's ids reach the host
        # fused, packed GEMMs (held once if asked), before the cache takes its share of the memory left;
        # torch.compile traces F.linear on the plain weights, so compiled layers keep them
        self.model.prepare_to_serve(release=release_weights and not self.sched.compile_layers)
        if self.sched.compile_layers:
            compile_feed_forward(self.model)
        cfg = self.model_config
        shapes = layer_shapes(cfg)
        dtype = next(self.model.parameters()).dtype
        self.cache = paged_cache(shapes, cache or CacheConfig(), dtype, device, model=self.model)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.last_step_tokens = 0  # tokens the last step computed (decode rows plus prompt tokens)
        self._ids = itertools.count()
        self.num_preemptions = 0  # since start, for the service's metrics (a counter only this thread writes)
        self.device = device
        self.host_waits = 0  # waits for a step's sampled ids, since start: one per step (benchmarks count them)
        self._in_flight: list[LaunchedStep] = []  # launched steps whose ids the host has not read, oldest first
        # Unseeded random requests draw their noise from this one generator, in one draw per step.
        self._shared_gen = torch.Generator(device=device)
        self._shared_gen.seed()
        self._sampling: SamplingBatch | None = None  # the last step's parameters on the device
        self._draft_sampling: SamplingBatch | None = None  # the last step's draft rows' (zeroc/speculative.py)
        self.penalties = PenaltyState(self.model_config.vocab_size, device)  # slots of penalized requests
        backend = self.model.backend
        self.guides = GuideCompiler(self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids,
                                    apply=backend.apply_token_bitmask)
        # The cpu backend's kernel module also samples (kernels/csrc/sampling.cpp, the same ids as the torch path
        # for the same draws); the torch and triton backends keep the torch sampler, which is what a GPU runs.
        self.native_sampler = backend.kernel if isinstance(backend, CpuBackend) else None
        # Speculative decoding (zeroc/speculative.py), where the cache can take back a draft's rows (plain pools).
        self.speculator = NgramProposer(self.sched.speculative_tokens if self.cache.policy is None else 0,
                                        self.sched.speculative_ngram_min, self.sched.speculative_ngram_max)
        self.spec_stats = SpecStats()  # for the service's metrics (counters only this thread writes)
        # Called once a sequence's prompt KV is in the cache, before its first token is sampled:
        # (request_id, prompt token ids, block table). The KV store keeps the prompt's full blocks.
        self.on_prompt_computed: Callable[[str, list[int], list[int]], None] | None = None
        # Benchmarks time the device work of a step (forward and sampling) inside this context.
        self.device_timer: Callable[[], contextlib.AbstractContextManager] | None = None
        # Benchmarks see where a step's wall time goes by handing over a zeroc.step_clock.StepClock.
        self.clock = NullClock()
        # The running sequences' block tables, lengths and next tokens, kept on the device across steps.
        max_blocks = -(-self.cache.token_capacity(cfg.max_position_embeddings) // self.cache.block_size) + 1
        self.state = InputBatch(self.sched.max_num_seqs, min(self.cache.num_blocks, max_blocks),
                                self.cache.block_size, device)
        graphs = not self.sched.enforce_eager and graphs_supported(self.model, self.cache)
        self.decode_runner = DecodeRunner(self.model, self.cache, self.state, use_graphs=graphs)

    # -- requests ---------------------------------------------------------------------------
    def prepare_prompt(self, prompt: str | list[int]) -> list[int]:
        """Tokenize and check a prompt; raises ZeroCError (PromptTooLongError if it cannot fit)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids or (isinstance(prompt, str) and not prompt):
            raise ZeroCError("prompt is empty")
        if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
            raise ZeroCError(f"prompt has token ids outside [0, {self.model_config.vocab_size})")
        limit = self.cache.token_capacity(self.model_config.max_position_embeddings)
        if len(ids) >= limit:
            raise PromptTooLongError(f"prompt has {len(ids)} tokens; the limit is {limit - 1}")
        return ids

    def check_sampling(self, params: SamplingParams) -> tuple[Any, int | None]:
        """Raise ZeroCError for parameters this model cannot take: logit_bias ids past its vocabulary; GuideError (a
        ValueError) for a guide that does not compile against its vocabulary (compiled once: later uses hit the
        compiler's cache). -> the guide's (matcher, token it starts after), (None, None) without one."""
        if any(t >= self.model_config.vocab_size for t, _ in params.logit_bias):
            raise ZeroCError(f"logit_bias has token ids outside [0, {self.model_config.vocab_size})")
        return (None, None) if params.guide is None else self.guides.start(params.guide)

    def check_priority(self, priority: int) -> None:
        """Raise ZeroCError for a priority this engine's scheduling policy cannot honour (any but 0 under fcfs)."""
        if priority and self.sched.policy != "priority":
            raise ZeroCError(f"priority {priority}: this server schedules in arrival order (scheduling policy "
                             f"{self.sched.policy!r}); priorities need --scheduling-policy priority")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cached_tokens: int = 0, priority: int = 0) -> str:
        """Queue a prompt. `cached_tokens` > 0: the KV of that many leading prompt tokens is already
        in the cache under `request_id` (slots taken with `reserve` and filled by a KV transfer). `priority`: lower
        runs first, under the "priority" scheduling policy (SchedulerConfig.policy)."""
        params = params or SamplingParams()
        ids = self.prepare_prompt(prompt)
        self.check_priority(priority)
        matcher, guide_after = self.check_sampling(params)
        request_id = request_id or f"req-{next(self._ids)}"
        if any(s.request_id == request_id for s in itertools.chain(self.waiting, self.running)):
            raise ZeroCError(f"request id {request_id!r} is already in use")
        if not 0 <= cached_tokens < len(ids) or self.cache.seq_len(request_id) != cached_tokens:
            raise ValueError(f"{request_id!r}: {cached_tokens} cached tokens claimed, "
                             f"{self.cache.seq_len(request_id)} reserved, prompt has {len(ids)}")
        if cached_tokens and params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: the prompt's logits come from computing it here; a request that "
                             "asks for them cannot start from cached tokens")
        stop_ids = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos
                                                                else self.model_config.eos_token_ids)
        scores = None if params.prompt_logprobs is None else PromptLogprobs(params.prompt_logprobs, ids)
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        self.waiting.append(Sequence(request_id, ids, params, detok,
                                     make_generator(params, self.device), in_cache=cached_tokens, stop_ids=stop_ids,
                                     hold=max((len(s) - 1 for s in params.stop), default=0), prompt_scores=scores,
                                     matcher=matcher, guide_after=guide_after, priority=priority,
                                     speculative=self.speculator.k > 0 and eligible(params)))
        return request_id

    def reserve(self, request_id: str, num_tokens: int) -> torch.Tensor:
        """Take cache slots for the first `num_tokens` prompt tokens of a request not yet added, so
        their KV can be written from elsewhere (a prefill service). Returns the slots: [num_tokens].
        Raises CacheFullError if the blocks are not free; `abort` releases them."""
        return self.cache.schedule([(request_id, num_tokens)]).slot_mapping

    def abort(self, request_id: str) -> bool:
        """Drop a request (or a reservation) and free its blocks: at once, or, where a step in flight holds a
        row for it, as soon as that step has run. Returns whether it was queued."""
        self._release(request_id)
        self.penalties.release(request_id)
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finished = True
                    return True
        return False

    def blocks_owed(self) -> int:
        """The blocks the waiting sequences that hold some still need for their whole context: what taking blocks
        for new work (a KV transfer's reservation) must leave free, or one of them gives way (`_unstall`)."""
        return sum(self.cache.blocks_needed(s.request_id, s.num_tokens - s.in_cache) for s in holders(self.waiting))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    def _release(self, request_id: str) -> None:
        """Free a sequence's blocks once no step in flight can still write them."""
        holder = next((s for s in reversed(self._in_flight) if s.holds(request_id)), None)
        if holder is None:
            self.cache.free(request_id)
        else:
            holder.free_after.append(request_id)

    def _finish(self, seq: Sequence) -> None:
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq.request_id)
        self.penalties.release(seq.request_id)

    def _finishing(self, seq: Sequence) -> bool:
        """Whether the token in flight for `seq` is certain to end it by length (so it needs no next row)."""
        return seq.pending > 0 and (len(seq.output_ids) + seq.pending >= seq.params.max_new_tokens
                                    or seq.num_tokens + seq.pending >= self.model_config.max_position_embeddings)

    def _split_running(self) -> tuple[list[Sequence], list[Sequence]]:
        """The running sequences as (those that take a row in the next step, in row order; those whose token in
        flight ends them by length)."""
        decoding, finishing = [], []
        for s in self.running:
            (finishing if self._finishing(s) else decoding).append(s)
        return decoding, finishing

    # -- scheduling -----------------------------------------------------------------------------
    def _reserve_decode(self, outputs: list[StepOutput]) -> tuple[list[Sequence], list[Sequence], int]:
        """Make room for one more token per decode row, preempting if needed (scheduling.preemption_victim) a running
        sequence or a waiting one that holds blocks (after reading the step in flight, whose results may free blocks
        and which must not hold a victim's row): -> (the decode rows, the running sequences that take none, the
        blocks the rows take). Appends to `outputs` what it reads and ends.

        A sequence that alone fills the whole cache cannot grow: it finishes with "length".
        """
        while self.running:
            decoding, finishing = self._split_running()
            need = sum(self.cache.blocks_needed(s.request_id, 1) for s in decoding)
            if need <= self.cache.num_free_blocks:
                return decoding, finishing, need
            if self._in_flight:
                outputs += self._collect()
                continue
            waiting = holders(self.waiting)
            victim = preemption_victim(self.running + waiting)
            if any(victim is s for s in waiting):
                self._preempt(victim)  # it keeps its place in the queue
                continue
            self.running.remove(victim)
            if not self.running and (len(self.cache.block_table(victim.request_id))
                                     + self.cache.blocks_needed(victim.request_id, 1) > self.cache.num_blocks):
                self.cache.free(victim.request_id)
                victim.finished = True
                outputs.append(StepOutput(victim.request_id, [], victim.detok.text[victim.released:], True,
                                          "length", victim.queued_s or 0.0, victim.preemptions))
                break
            self._preempt(victim)
            self.waiting.appendleft(victim)
        return [], [], 0

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks: it computes its context again when admitted."""
        self.cache.free(seq.request_id)
        seq.in_cache = 0
        seq.preemptions += 1
        self.num_preemptions += 1

    def _unstall(self) -> bool:
        """With nothing running or in flight, waiting sequences that hold blocks may each wait for blocks another
        holds: free the blocks of the one that gives way (it is computed again). Whether one did."""
        waiting = holders(self.waiting)
        if self.running or self._in_flight or not waiting:
            return False
        self._preempt(preemption_victim(waiting))
        return True

    def step(self) -> list[StepOutput]:
        """Launch one forward for every scheduled sequence, sampling one token for each that has computed its
        whole context (a chunk of a prompt samples nothing), and return the outputs of the step whose ids
        reached the host: this one, or with async scheduling the one before it."""
        outputs: list[StepOutput] = []
        self.clock.start()
        while self._in_flight and self._in_flight[-1].synced:  # guided, speculating rows: their next steps need it
            outputs += self._collect()
        launched = self._launch(outputs)
        if launched is not None:
            self._in_flight.append(launched)
        # Run ahead: the previous step's host work while the device runs this one. Otherwise: this one's.
        ahead = 1 if self.runs_ahead and launched is not None else 0
        while len(self._in_flight) > ahead:
            outputs += self._collect()
        return outputs

    def _launch(self, outputs: list[StepOutput]) -> LaunchedStep | None:
        """Schedule the next step and launch its forward and sampling (appending to `outputs` what scheduling
        itself finishes); None when there is nothing to run."""
        decoding, finishing, need = self._reserve_decode(outputs)
        decoding, drafted, need = self.speculator.plan(decoding, need, self.cache,  # speculating rows apart
                                                       self.model_config.max_position_embeddings,
                                                       self.sched.max_num_batched_tokens - len(decoding))
        spec, spec_tokens = [s for s, _ in drafted], sum(1 + len(d) for _, d in drafted)
        budget = self.sched.max_num_batched_tokens - len(decoding) - spec_tokens
        admitted = admit(self.waiting, len(decoding) + len(spec), self.cache, self.cache.num_free_blocks - need,
                         budget, self.sched.max_num_seqs)
        if not decoding and not drafted and not admitted and self._unstall():
            admitted = admit(self.waiting, 0, self.cache, self.cache.num_free_blocks, budget, self.sched.max_num_seqs)
        self.state.keep([s.request_id for s in decoding])  # rows of sequences that left (or speculate) go
        self.last_step_tokens = len(decoding) + spec_tokens + sum(n for _, n in admitted)
        self.clock.lap("schedule")
        if not decoding and not drafted and not admitted:
            return None
        done = [seq for seq, n in admitted if seq.in_cache + n == seq.num_tokens]  # prompts computed in full
        rows = decoding + spec + [seq for seq, _ in admitted]
        samples = {id(s) for s in decoding + spec + done}  # rows whose token counts
        scoring = PromptRows.plan([(s.prompt_scores, s.in_cache, n) for s, n in admitted], len(decoding) + spec_tokens)
        with torch.inference_mode(), (self.device_timer() if self.device_timer else contextlib.nullcontext()):
            logits = self._forward(decoding, admitted, scoring, drafted)  # [B (+ prompt rows, draft rows), vocab]
            self.clock.lap("forward")
            launched = self._sample(logits, rows, samples, scoring, drafted)
            self.clock.lap("sample")
        # While the device works: host bookkeeping that needs no sampled id.
        for seq, n in admitted:
            seq.in_cache += n
        for seq in decoding + spec + done:
            seq.pending += 1
        self.running = decoding + spec + done + finishing  # finishing ones leave when their last id is read
        if self.on_prompt_computed is not None:
            for seq in done:  # before their blocks can be freed
                self.on_prompt_computed(seq.request_id, seq.prompt_ids, self.cache.block_table(seq.request_id))
        self.clock.lap("bookkeeping")
        return launched

    def _sample(self, logits: Tensor, rows: list[Sequence], samples: set[int], scoring: PromptRows | None,
                drafted: list[tuple[Sequence, list[int]]]) -> LaunchedStep:
        """Sample the step's tokens on the device and start their one copy to the host: logits [B (+ prompt rows,
        draft rows), vocab] from `_forward`. Built while the forward runs (its copies queue behind it); a chunk's
        row draws nothing."""
        extra, logits = logits[len(rows):], logits[: len(rows)]
        scored = len(scoring.indices) if scoring is not None else 0
        prompt_logits, draft_logits = extra[:scored], extra[scored:]  # the prompt rows', then each draft token's
        params = [s.params if id(s) in samples else _CHUNK for s in rows]
        gens = [s.generator if p is not _CHUNK else None for s, p in zip(rows, params)]
        sampling = SamplingBatch.build(params, gens, self.model_config.vocab_size, self.device, self._sampling)
        self._sampling = sampling  # the next step's, where its rows sample alike (no copy then)
        penalties = self._penalties(rows, params)
        k = max([p.logprobs for p in params if p.logprobs is not None] + ([scoring.k] if scoring else []),
                default=None)
        guided = [s.matcher is not None and id(s) in samples for s in rows]  # waiting for `after` or not
        scores = self._scores(logits, rows, samples, penalties, guided, keep_logits=k is not None)
        drawn = marks(drafted)  # before this step draws: a seeded row gives back what its dropped tokens drew
        checks = None  # [sum of the drafts' lengths], drawn first: a draft's rows come before its row's last token
        if drafted:
            self._draft_sampling = draft_sampling(drafted, self.model_config.vocab_size, self.device,
                                                  self._draft_sampling)
            checks = sample_batch(draft_logits, self._draft_sampling, self._shared_gen, self.native_sampler)
        sampled = sample_batch(scores, sampling, self._shared_gen, self.native_sampler)  # [B] on the device
        if penalties is not None:
            self.penalties.record(penalties, sampled)  # the next step's penalties see this token
        self.state.set_tokens(sampled)  # the decode rows' next inputs, without the host
        packed = sampled if k is None else with_logprobs(logits, sampled, k)
        packed = packed if scoring is None else scoring.pack(packed, prompt_logits, k)
        if checks is not None and k is not None:
            checks = with_logprobs(draft_logits, checks, k)  # [sum of the drafts' lengths, 2 + 2k]
        if checks is not None and scoring is None:  # one copy to the host: the sampled rows, then these
            packed, checks = torch.cat([packed, checks]), None
        synced = any(guided) or (self.speculator.k > 0 and any(s.speculative for s in rows if id(s) in samples))
        return LaunchedStep(rows, samples, DeviceToHost(packed), k, scoring, drafts={id(s): d for s, d in drafted},
                         targets=DeviceToHost(checks) if checks is not None else None, synced=synced, marks=drawn)

    def _penalties(self, rows: list[Sequence], params: list[SamplingParams]):
        """The step's `PenaltyBatch` (None when no row sets a penalty), admitting rows that have no slot yet."""
        for seq, p in zip(rows, params):
            if p.penalized:
                self.penalties.admit(seq.request_id, seq.prompt_ids, seq.output_ids, p.logit_bias)
        return self.penalties.batch([(s.request_id, p, p is not _CHUNK) for s, p in zip(rows, params)])

    def _collect(self) -> list[StepOutput]:
        """Read the oldest step in flight's ids (waiting for it) and advance its sequences; rows of sequences
        that finished or were aborted meanwhile are discarded."""
        step = self._in_flight.pop(0)
        got = step.ids.tolist()  # the step's one wait for the device
        self.host_waits += 1
        if step.prompt_rows is not None:
            step.prompt_rows.read(got[len(step.rows):], step.logprobs)
        self.clock.lap("wait")
        outputs = []
        if step.drafts and step.targets is None:  # the drafts' checks came after the sampled ids
            targets, got = got[len(step.rows):], got[: len(step.rows)]
        else:
            targets = step.targets.tolist() if step.targets is not None else []
        at = 0
        for seq, row in zip(step.rows, got):
            if id(seq) in step.samples:
                seq.pending -= 1
                draft = step.drafts.get(id(seq)) if step.drafts else None
                if draft is not None:  # the samples after its last token and each draft token but the last
                    checked, at = targets[at: at + len(draft)], at + len(draft)
                if not seq.finished:
                    token = row if step.logprobs is None else int(row[0])
                    if draft is not None and token != FAILED:
                        outputs.append(self._accept(seq, draft, checked + [row], step.logprobs,
                                                    step.marks.get(id(seq))))
                        continue
                    seq.in_cache = seq.num_tokens
                    wanted = seq.params.logprobs
                    lp = () if wanted is None else (read_logprobs(row, step.logprobs, wanted),)
                    out = self._fail(seq) if token == FAILED else self._advance(seq, token, lp)
                    scored = seq.prompt_scores.take() if seq.prompt_scores is not None else None
                    outputs.append(out if scored is None else replace(out, prompt_logprobs=scored))
        for request_id in step.free_after:
            self._release(request_id)  # or later still, if a newer step in flight holds it too
        self.clock.lap("outputs")
        return outputs

    def _forward(self, decoding: list[Sequence], admitted: list[tuple[Sequence, int]],
                 scoring: PromptRows | None = None, drafted: list[tuple[Sequence, list[int]]] = ()) -> Tensor:
        """Reserve the step's slots, update the persistent batch and launch the forward -> logits [B, vocab], then
        the prompt rows' [rows, vocab] if `scoring`, then the drafts' [sum of their lengths, vocab]. Decode rows take
        one token each (their last sampled id, already on the device); speculating rows their last token and draft,
        admitted ones their next uncached tokens (all, or a chunk), from the host. Those rows leave the batch next
        step, but for prompts computed in full."""
        plan = [(s.request_id, 1) for s in decoding] + [(s.request_id, 1 + len(d)) for s, d in drafted]
        reserved = self.cache.append_slots(plan + [(s.request_id, n) for s, n in admitted])
        self.state.decode([grown for _, grown in reserved[: len(decoding)]])
        if not admitted and not drafted and self.cache.places_by_position:
            self.clock.lap("inputs")  # the decode runner's copies into its graph's buffers count as its forward
            return self.decode_runner.run(len(decoding))
        host = [(s, [(s.output_ids or s.prompt_ids)[-1], *d]) for s, d in drafted]  # its last token, then the draft
        host += [(s, s.all_ids[start: start + n]) for (s, n), (start, _) in zip(admitted, reserved[len(plan):])]
        prefill, rows = [], []
        for (seq, toks), (start, _) in zip(host, reserved[len(decoding):]):
            rid, end = seq.request_id, start + len(toks)
            prefill.append((toks, list(range(start, end)), self.cache.slots(rid, start, end)))
            rows.append((rid, self.cache.block_table(rid), end))
        self.state.add(rows)
        tokens, batch = self.state.paged_batch(len(decoding), prefill, self.cache.places_by_position)
        self.clock.lap("inputs")
        last = batch.last_token_indices
        indices = last if scoring is None else scoring.logits_indices(last)
        if drafted:  # each draft token's logits: the sample after it checks the next draft token
            at, rows_of = len(decoding), []
            for _, d in drafted:
                rows_of += range(at, at + len(d))
                at += 1 + len(d)
            indices = torch.cat([indices, host_to_device(rows_of, torch.long, self.device)])
        return self.model.forward_paged(tokens, batch.positions, batch, self.cache, logits_indices=indices)

    def _scores(self, logits: Tensor, rows: list[Sequence], samples: set[int], penalties: PenaltyBatch | None,
                guided: list[bool], keep_logits: bool) -> Tensor:
        """What a step samples from: logits [B, vocab] after the penalties, the stop tokens of rows short of their
        min_tokens out of reach, then each guide's mask. The logits themselves change only where nothing reads them
        after sampling (`keep_logits` False: no log-probabilities asked)."""
        scores = logits if penalties is None else self.penalties.apply(logits, penalties)  # [B, vocab]
        own = scores is not logits or not keep_logits  # may change in place
        short = [(i, s.stop_ids) for i, s in enumerate(rows)
                 if id(s) in samples and s.stop_ids and len(s.output_ids) + s.pending < s.params.min_tokens]
        if short:
            scores, own = ban_tokens(scores if own else scores.clone(), short), True
        matchers = [s.matcher if g and s.guide_after is None else None for s, g in zip(rows, guided)]
        return self.guides.mask(scores, matchers, copy=not own)  # structured output: what a guide forbids

    def _accept(self, seq: Sequence, draft: list[int], rows: list, k: int | None, mark: Tensor | None) -> StepOutput:
        """A speculating row's tokens: its samples as far as its draft held, and the next (zeroc/speculative.py).
        rows[i]: the sample at the position after its last token and draft[:i], an id or (`k` not None) a row of
        `with_logprobs`. Its cache keeps the rows of the tokens computed that stay (its last token and the draft
        tokens kept), its generator (`mark`: where seeded) the draws of the tokens kept."""
        tokens = accept(draft, rows if k is None else [int(r[0]) for r in rows])
        if FAILED in tokens:  # a draft row's logits were not finite
            return self._fail(seq)
        if mark is not None and len(tokens) <= len(draft):
            rewind(seq.generator, mark, len(tokens))
        self.spec_stats.record(draft, tokens)
        seq.in_cache = seq.num_tokens + len(tokens) - 1
        self.cache.truncate(seq.request_id, seq.in_cache)
        outs, wanted = [], seq.params.logprobs
        for token, row in zip(tokens, rows):
            outs.append(self._advance(seq, token, () if wanted is None else (read_logprobs(row, k, wanted),)))
            if outs[-1].finished:
                break
        return replace(outs[-1], token_ids=[t for o in outs for t in o.token_ids],
                       text_delta="".join(o.text_delta for o in outs),
                       logprobs=tuple(lp for o in outs for lp in o.logprobs))

    def _fail(self, seq: Sequence, why: str = "the model's logits for this sequence are not finite (NaN or inf)"
              ) -> StepOutput:
        """Finish one sequence that cannot go on; the rest of its batch carries on."""
        self._finish(seq)
        return StepOutput(seq.request_id, [], seq.detok.text[seq.released:], True, "error", seq.queued_s or 0.0,
                          seq.preemptions, error=why)

    def _advance(self, seq: Sequence, token: int, logprobs: tuple[TokenLogprobs, ...] = ()) -> StepOutput:
        """Take a sampled token (Sequence.advance: guide, stop checks, text); a finished sequence leaves."""
        out = seq.advance(token, self.model_config.max_position_embeddings, logprobs)
        if out.finished:
            self._finish(seq)
        return out

    # -- convenience ---------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[GenerationResult]:
        """Run prompts to completion together (continuous batching); results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        results = Results({s.request_id: list(s.prompt_ids) for s in self.waiting})
        while self.has_unfinished():
            for out in self.step():
                results.add(out)
        return results.ordered(ids)
