"""The GenerationService servicer and the decode service's process entry point.

The servicer is the edge: it turns protobuf requests into `GenerateInput`, maps errors to gRPC
statuses, and streams `StepOutput`s back. Scheduling lives in `EngineLoop`; KV transfer behind
`KvTransport` (absent in colocated mode, where the engine prefills locally).
"""

from __future__ import annotations

import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from decode_service.loop import CancelledError, EngineLoop, QueueFullError, ShuttingDownError, Ticket
from kv_store.peer import SERVICE_NAME as KV_SERVICE_NAME
from kv_store.peer import KvStoreServicer
from kv_store.service import KvStoreHandle, attach_store, set_store_health, store_snapshot
from kv_store.store import KvStore
from zeroc.auth import TokenAuth
from zeroc.caches import kv_footprint
from zeroc.config import ZeroCConfig
from zeroc.engine import Engine, PromptTooLongError, StepOutput
from zeroc.kv_transfer import KvTransferError, KvTransport, model_fingerprint
from zeroc.loader import load_model
from zeroc.metrics import (MetricsServer, ServiceMetrics, TokenClock, cache_source, counter, load_families,
                           serve_metrics, store_families)
from zeroc.rpc import MAX_MODEL_CHARS, REPLICA_HEADER, CallCounter, ServiceHost, add_servicer, check_id, quote
from zeroc.sampling import Guide, SamplingParams
from zeroc.tls import is_service_call
from zeroc.transport.landing import kv_fingerprint, receive_into
from zeroc.transport.decode_side import make_kv_transport
from zeroc.v1 import generation_pb2 as pb
from zeroc.v1 import generation_pb2_grpc, kv_store_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
# A sequence the engine ended on its own account (non-finite logits, ...): that request alone fails.
ERROR_FINISH = "error"
# Prefill failures a decode service answers by prefilling locally (with --prefill-fallback local):
# gone, full, or stalled past the transfer timeout (while the caller's own deadline still allows it).
_FALL_BACK = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Addresses in a transfer error (the prefill service's, as the transport and gRPC's own details name it) are
# for the log: clients of the public API are not told where the internal services listen.
_ADDRESS = re.compile(r"unix:[^\s,;]+|(?:ipv4:|ipv6:|dns:)?(?:\[[0-9a-fA-F:.]+\]|[\w.-]+):\d+")


def without_addresses(text: str) -> str:
    return _ADDRESS.sub("<internal address>", text)


@dataclass(frozen=True)
class GenerateInput:
    """A checked Generate request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str = ""  # whose prefix cache the request reads and fills
    priority: int = 0  # GenerateRequest.priority, checked against the scheduling policy


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Proto defaults (zeros) mean the runtime defaults. Raises ValueError on invalid values."""
    return SamplingParams(
        max_new_tokens=s.max_tokens or SamplingParams.max_new_tokens, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p or 1.0, min_p=s.min_p, seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos, min_tokens=s.min_tokens,
        include_stop_str_in_output=s.include_stop_str_in_output,
        logprobs=s.logprobs if s.HasField("logprobs") else None, frequency_penalty=s.frequency_penalty,
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        presence_penalty=s.presence_penalty, repetition_penalty=s.repetition_penalty or 1.0,
        logit_bias=dict(s.logit_bias), guide=guide_from_proto(s.guide) if s.HasField("guide") else None,
        skip_special_tokens=s.skip_special_tokens if s.HasField("skip_special_tokens") else True)


def guide_from_proto(g: pb.Guide) -> Guide:
    """Raises ValueError for a guide with no kind or a json_object that is false."""
    kind = g.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not g.json_object):
        raise ValueError("guide: set one kind (json_object true, json_schema, regex, choice or grammar)")
    if kind == "json_object":
        return Guide("json", after=g.after)
    if kind == "choice":
        return Guide("choice", choices=tuple(g.choice.choices), after=g.after)
    return Guide(kind, getattr(g, kind), after=g.after)


def logprobs_to_proto(logprobs) -> list[pb.TokenLogprobs]:
    return [pb.TokenLogprobs(logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top],
                             top_logprobs=[v for _, v in lp.top]) for lp in logprobs]


# Prompt positions per message of a request's prompt log-probabilities: at 20 alternatives an entry is about 200
# bytes, so a slice stays under 1 MiB, well within a client's default 4 MiB message limit.
PROMPT_SLICE = 4096


def prompt_deltas(prompt_ids: list[int], logprobs) -> Iterator[pb.TokenDelta]:
    """The prompt and its log-probabilities (one fewer: the first token has none) as the stream's first deltas."""
    for at in range(0, len(prompt_ids), PROMPT_SLICE):
        yield pb.TokenDelta(prompt_token_ids=prompt_ids[at: at + PROMPT_SLICE], prompt_logprobs=logprobs_to_proto(
            logprobs[max(0, at - 1): at + PROMPT_SLICE - 1]))


@dataclass
class _Ready:
    """What exists once the model has loaded."""

    engine: Engine
    loop: EngineLoop
    model_name: str
    fingerprint: str
    dtype: str
    kv_store: KvStore | None


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Registered before the model loads (answering UNAVAILABLE) so health is reachable meanwhile."""

    def __init__(self, transport: KvTransport | None, transfer_timeout_s: float, draining: threading.Event,
                 auth: TokenAuth | None = None, fallback: str = "local", allow_plaintext: str = "loopback",
                 metrics: ServiceMetrics | None = None):
        self.transport, self.draining, self.fallback = transport, draining, fallback
        self.allow_plaintext = allow_plaintext  # who counts as a service without mTLS (SecurityConfig)
        self.metrics = metrics or ServiceMetrics()
        self.auth = auth or TokenAuth(None, "")
        self.tenants: dict[str, str] = {}  # engine request id -> tenant, while the request runs
        self.calls = CallCounter()
        self.transfer_timeout_s = transfer_timeout_s
        self.ready: _Ready | None = None
        # Sent to clients with every accepted call: which replica process ran it (zeroc.rpc.REPLICA_HEADER).
        self.replica_id = secrets.token_hex(4)

    def _state(self, context: grpc.ServicerContext) -> _Ready:
        if self.ready is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.ready

    def _parse(self, request: pb.GenerateRequest, state: _Ready, context: grpc.ServicerContext) -> GenerateInput:
        check_id("request_id", request.request_id, context)
        check_id("model", request.model, context, MAX_MODEL_CHARS)
        if request.model and request.model != state.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {quote(request.model)}; "
                                                     f"this service serves {state.model_name!r}")
        if request.prompt and request.prompt_token_ids:
            context.abort(_INVALID, "set either prompt or prompt_token_ids, not both")
        try:
            params = sampling_from_proto(request.sampling)
            state.engine.check_sampling(params)
            state.engine.check_priority(request.priority)
            ids = state.engine.prepare_prompt(request.prompt or list(request.prompt_token_ids))
        except PromptTooLongError as exc:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        except ValueError as exc:  # ZeroCError is a ValueError: empty prompt, bad ids, bad sampling
            context.abort(_INVALID, str(exc))
        return GenerateInput(request.request_id or f"gen-{time.time_ns():x}", ids, params, self.auth.tenant(context),
                             request.priority)

    def Generate(self, request, context):
        arrived = time.monotonic()
        self.auth.tenant(context)  # UNAUTHENTICATED before any other answer
        state = self._state(context)
        # Counted before the draining check: a call that passes it is one the drain waits for.
        self.calls.enter(context)
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down; use another replica")
        context.send_initial_metadata(((REPLICA_HEADER, self.replica_id),))  # accepted: this replica runs it
        req = self._parse(request, state, context)
        try:
            ticket = state.loop.admit(req.priority)
        except QueueFullError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ShuttingDownError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        self.tenants[ticket.key] = req.tenant
        # Runs however the call ends (finished, cancelled, deadline, disconnect): blocks free at once, or once the
        # handler stops writing into them (EngineLoop.filling).
        def gone() -> None:
            state.loop.release(ticket)
            self.tenants.pop(ticket.key, None)
        if not context.add_callback(gone):  # the call ended already: gRPC will not call it
            gone()
            context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request started")
        with state.loop.filling(ticket):
            kv_bytes, reused = self._start(req, ticket, state, context)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if kv_bytes:
            self.metrics.kv_bytes(self.transport.kind or "grpc", "received", kv_bytes)
        log.info("generate", extra={"request_id": req.request_id, "prompt_tokens": len(req.prompt_ids),
                                    "kv_bytes": kv_bytes, "cached_prefix_tokens": reused})
        yield from self._stream(req, ticket, context, arrived, kv_bytes, reused)

    def _start(self, req: GenerateInput, ticket: Ticket, state: _Ready, context: grpc.ServicerContext
               ) -> tuple[int, int]:
        """Get the prompt's KV (the cached prefix from the KV store, the rest from the prefill service
        unless colocated) and hand it to the engine. Returns (KV bytes from prefill, prefix tokens reused)."""
        ids, cached, kv_bytes, reused = req.prompt_ids, 0, 0, 0
        # A request for prompt log-probabilities computes its whole prompt here: the logits come from computing it.
        reuse = len(ids) > 1 and req.params.prompt_logprobs is None
        try:
            if self.transport is not None and reuse:
                try:
                    kv_bytes, reused = self._remote_prefill(req, ticket, state, context)
                    cached = len(ids) - 1
                except KvTransferError as exc:
                    left = context.time_remaining()
                    if (exc.code not in _FALL_BACK or self.fallback != "local" or not context.is_active()
                            or (left is not None and left <= 0)):
                        raise
                    # The prefill service is away: this service holds the model, so it computes the prompt.
                    log.warning("prefill unavailable; prefilling locally", extra={
                        "request_id": req.request_id, "code": exc.code.name, "error": str(exc)})
                    state.loop.unreserve(ticket)
                    kv_bytes = 0
                    cached = reused = self._colocated_prefix(state, ticket, ids[:-1], context, req) \
                        if state.kv_store is not None else 0
            elif state.kv_store is not None and reuse:
                cached = reused = self._colocated_prefix(state, ticket, ids[:-1], context, req)
            state.loop.submit(ticket, ids, req.params, cached)
        except KvTransferError as exc:
            state.loop.release(ticket)
            log.warning("kv transfer failed", extra={"request_id": req.request_id, "code": exc.code.name,
                                                     "error": str(exc)})
            context.abort(exc.code, without_addresses(str(exc)))
        except CancelledError as exc:
            state.loop.release(ticket)
            context.abort(grpc.StatusCode.CANCELLED, str(exc))
        except ShuttingDownError as exc:
            state.loop.release(ticket)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return kv_bytes, reused

    def _remote_prefill(self, req: GenerateInput, ticket: Ticket, state: _Ready, context: grpc.ServicerContext
                        ) -> tuple[int, int]:
        """The prompt's KV but its last token: the cached prefix from the store, the rest from the prefill
        service (the engine runs the last token itself and samples the first token with the request's own
        generator). Returns (KV bytes received, prefix tokens reused)."""
        ids = req.prompt_ids
        slots = state.loop.reserve(ticket, len(ids) - 1, context.is_active)
        reused = self._load_prefix(state, ids[:-1], slots, req)
        if reused == len(ids) - 1:
            return 0, reused
        remaining = context.time_remaining()
        timeout = min(self.transfer_timeout_s, remaining) if remaining is not None else self.transfer_timeout_s
        receiver, land = receive_into(state.engine.cache, ticket.key, slots[reused:], start=reused)
        kv_bytes = self.transport.fetch(ticket.key, ids[:-1], receiver, timeout, context.is_active,
                                        cached_prefix_tokens=reused, tenant=req.tenant, priority=req.priority)
        state.loop.run_locked(land)  # a KV policy encodes the full-precision KV into its own blocks
        return kv_bytes, reused

    @staticmethod
    def _load_prefix(state: _Ready, ids: list[int], slots, req: GenerateInput) -> int:
        """Put the longest prefix of `ids` in the tenant's cache into the request's slots; returns its tokens
        (0 on any store failure: the prompt is then computed as if nothing were cached)."""
        if state.kv_store is None:
            return 0
        try:
            return state.kv_store.load(state.kv_store.plan(ids, req.tenant), state.engine.cache, slots).tokens
        except Exception:
            log.exception("kv store load failed; computing the whole prompt", extra={"request_id": req.request_id})
            return 0

    def _colocated_prefix(self, state: _Ready, ticket: Ticket, ids: list[int], context: grpc.ServicerContext,
                          req: GenerateInput) -> int:
        """Colocated: reserve and fill slots for the cached prefix of `ids`; the engine computes the rest."""
        plan = state.kv_store.plan(ids, req.tenant)
        if not plan.tokens:
            return 0
        slots = state.loop.reserve(ticket, plan.tokens, context.is_active)
        if self._load_prefix(state, ids[:plan.tokens], slots, req) == plan.tokens:
            return plan.tokens
        state.loop.unreserve(ticket)  # part of the prefix went missing meanwhile: compute it all
        return 0

    def _stream(self, req: GenerateInput, ticket: Ticket, context: grpc.ServicerContext, arrived: float,
                kv_bytes: int, reused: int):
        ttft_ms, produced, pending = None, 0, None
        clock = TokenClock(self.metrics, arrived)
        while True:
            try:
                out, pending = (pending, None) if pending is not None else (ticket.out.get(timeout=0.5), None)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(out, StepOutput) and out.finish_reason != ERROR_FINISH:
                out, pending = _coalesce(ticket.out, out)
            if isinstance(out, Exception):
                context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {quote(out, 200)}")
            assert isinstance(out, StepOutput)
            if out.finish_reason == ERROR_FINISH:
                why = getattr(out, "error", None) or "the sequence's computation failed"
                context.abort(grpc.StatusCode.INTERNAL, f"generation failed for this request: {quote(why, 200)}")
            now = time.monotonic()
            if ttft_ms is None and out.token_ids:
                ttft_ms = (now - arrived) * 1000
            clock.tokens(len(out.token_ids), now)
            produced += len(out.token_ids)
            if out.prompt_logprobs is not None:
                for delta in prompt_deltas(req.prompt_ids, out.prompt_logprobs):
                    yield pb.GenerateResponse(request_id=req.request_id, delta=delta)
            if out.token_ids or out.text_delta:
                yield pb.GenerateResponse(request_id=req.request_id, delta=pb.TokenDelta(
                    token_ids=out.token_ids, text=out.text_delta, logprobs=logprobs_to_proto(out.logprobs)))
            if out.finished and out.finish_reason == "error":  # this request alone failed (non-finite logits)
                context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {out.error}")
            if out.finished:
                self.metrics.finished(out.finish_reason or "stop", now - arrived)
                self.metrics.queue_time.observe(ticket.reserve_wait_s + out.queued_s)
                usage = pb.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=produced,
                                 ttft_ms=ttft_ms or 0.0, kv_bytes_received=kv_bytes, cached_prefix_tokens=reused,
                                 queue_ms=(ticket.reserve_wait_s + out.queued_s) * 1000,
                                 preemptions=out.preemptions)
                yield pb.GenerateResponse(request_id=req.request_id, result=pb.GenerateResult(
                    finish_reason=FINISH.get(out.finish_reason or "stop", pb.FINISH_REASON_STOP), usage=usage))
                return

    def GetModelInfo(self, request, context):
        self.auth.tenant(context)
        state = self._state(context)
        cfg, stats = state.engine.model_config, state.loop.stats()
        return pb.GetModelInfoResponse(
            model=state.model_name, fingerprint=state.fingerprint, vocab_size=cfg.vocab_size,
            max_context=cfg.max_position_embeddings, num_layers=cfg.num_hidden_layers, dtype=state.dtype,
            mode="colocated" if self.transport is None else "disaggregated",
            kv_blocks_total=stats.blocks_total, kv_blocks_free=stats.blocks_free, kv_block_size=stats.block_size,
            requests_running=stats.running, requests_queued=stats.queued,
            kv_store=store_info(state.kv_store, internal=is_service_call(context, self.allow_plaintext)),
            attention_backend=state.engine.model.backend.name, kv_token_capacity=stats.token_capacity,
            kv_cache_bytes=stats.blocks_total * state.engine.cache.bytes_per_block)

    def Tokenize(self, request, context):
        self.auth.tenant(context)
        state = self._state(context)
        return pb.TokenizeResponse(
            token_ids=state.engine.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens))


def store_info(store: KvStore | None, internal: bool) -> pb.KvStoreInfo:
    """The store's state and capacity to anyone; its index (Redis), holder address and activity counters
    (blocks held, lookups, hits, peer fetches, errors, evictions) only to `internal` callers (services of
    the deployment). To a public client the addresses are a map of where to attack next, and the counters,
    summed over every tenant, tell one tenant when and how much the others' prompts hit the cache."""
    if store is None:
        return pb.KvStoreInfo(state="off")
    s = store.stats()
    if not internal:
        return pb.KvStoreInfo(state=s.state, capacity_blocks=s.capacity_blocks)
    return pb.KvStoreInfo(state=s.state, index=s.index, holder=s.holder, blocks_held=s.blocks_held,
                          capacity_blocks=s.capacity_blocks, lookups=s.lookups, hit_tokens=s.hit_tokens,
                          peer_blocks=s.peer_blocks, index_errors=s.index_errors, reconnects=s.reconnects,
                          evictions=s.evictions)


def spec_families(engine: Engine) -> list:
    """Speculative decoding's counters (zeroc/speculative.py), vLLM's names but for the prefix."""
    s = engine.spec_stats
    return [counter("zeroc:spec_decode_num_drafts", "Steps of a speculating request that checked a draft.", s.drafts),
            counter("zeroc:spec_decode_num_draft_tokens", "Draft tokens checked.", s.draft_tokens),
            counter("zeroc:spec_decode_num_accepted_tokens", "Draft tokens kept (each a token a step gained).",
                    s.accepted_tokens)]


def watch_decode(metrics: ServiceMetrics, engine: Engine, loop: EngineLoop, store: KvStore | None,
                 cfg: ZeroCConfig) -> None:
    """The series a decode service reads at scrape time: load, cache, preemptions, KV store."""
    metrics.watch(lambda: load_families(*loop.load()))
    metrics.watch(cache_source(engine.cache, kv_footprint(engine.cache, engine.model_config, cfg.cache)))
    metrics.watch(lambda: [counter("zeroc:num_preemptions", "Sequences preempted (their blocks freed, recomputed "
                                   "later) for cache space.", engine.num_preemptions), *spec_families(engine)])
    metrics.watch(lambda: store_families(store_snapshot(store)))


class DecodeService:
    """A decode service's parts, brought up in order: `start` (listen, NOT_SERVING), `load`, serve."""

    def __init__(self, cfg: ZeroCConfig):
        self.cfg = cfg
        self.fingerprint = kv_fingerprint(model_fingerprint(cfg.model_dir), cfg.cache)
        self.transport = None
        if cfg.transfer.prefill_target:  # first: an impossible transport setting is a one-line error
            self.transport = make_kv_transport(cfg, self.fingerprint)
        auth = TokenAuth.from_file(cfg.security.tokens_file, cfg.security.default_tenant)
        self.host = ServiceHost(cfg.server, [SERVICE_NAME, KV_SERVICE_NAME], cfg.security)
        self.metrics = ServiceMetrics()
        self.metrics_server: MetricsServer | None = None
        self.servicer = GenerationServicer(self.transport, cfg.transfer.timeout_s, self.host.draining, auth,
                                           cfg.transfer.prefill_fallback, cfg.security.allow_plaintext, self.metrics)
        add_servicer(generation_pb2_grpc.add_GenerationServiceServicer_to_server, self.servicer, self.host.server)
        self.kv_servicer = KvStoreServicer(cfg.transfer.chunk_bytes, cfg.server.max_message_mb << 20, cfg.store,
                                           cfg.security.allow_plaintext)
        add_servicer(kv_store_pb2_grpc.add_KvStoreServiceServicer_to_server, self.kv_servicer, self.host.server)
        self.loop: EngineLoop | None = None
        self.store_handle: KvStoreHandle | None = None

    def start(self) -> str:
        """Listen (gRPC, and metrics when a port is set); returns the public address."""
        self.host.start()
        self.metrics_server = serve_metrics(self.metrics, self.cfg.server.host, self.cfg.metrics.port)
        return self.host.address

    def load(self) -> None:
        cfg = self.cfg
        loaded = load_model(cfg.model_dir, cfg.dtype, cfg.device, cfg.attention_backend, cfg.pack_weights)
        engine = Engine(loaded, cfg.cache, cfg.scheduler, release_weights=True)  # this process owns its model
        self.store_handle = attach_store(cfg, loaded, self.fingerprint, self.host, self.kv_servicer)
        store = self.store_handle.store if self.store_handle else None
        if store is not None:
            tenants = self.servicer.tenants
            engine.on_prompt_computed = lambda rid, ids, table: store.offer(ids, engine.cache, table,
                                                                            tenants.get(rid, ""))
        self.loop = EngineLoop(engine, cfg.server.max_queue, cfg.threads)
        watch_decode(self.metrics, engine, self.loop, store, cfg)
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        self.servicer.ready = _Ready(engine, self.loop, Path(cfg.model_dir).name, self.fingerprint, dtype, store)
        self.host.set_serving()
        if store is not None:
            set_store_health(self.host, store.state)
        log.info("serving", extra={"service": "decode", "address": self.host.address, "model": cfg.model_dir,
                                   "prefill": cfg.transfer.prefill_target or "colocated",
                                   "attention_backend": cfg.attention_backend,
                                   "async_scheduling": engine.runs_ahead,
                                   "cuda_graphs": engine.decode_runner.use_graphs})

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.host.server.stop(0)
        if self.loop is not None:
            self.loop.stop()
        if self.store_handle is not None:
            self.store_handle.close()
        if self.transport is not None:
            self.transport.close()


def serve(cfg: ZeroCConfig, ready=print) -> None:
    """Listen first (health NOT_SERVING), load the model, then serve until SIGTERM."""
    svc = DecodeService(cfg)
    try:
        svc.host.install_signal_handlers()
        svc.start()
        ready(f"decode service {svc.host.listening}")
        svc.load()
        svc.host.wait_and_drain(svc.loop.stop, svc.servicer.calls.busy)
    finally:
        svc.close()


def _coalesce(outputs: queue.Queue, out: StepOutput) -> tuple[StepOutput, object | None]:
    """`out` with the steps already queued behind it (tokens a stream that fell behind owes its client)
    joined into one message, and what must not join it (an error; None if nothing)."""
    joined = [out]
    while not joined[-1].finished:
        try:
            nxt = outputs.get_nowait()
        except queue.Empty:
            break
        if not isinstance(nxt, StepOutput) or nxt.finish_reason == ERROR_FINISH:
            return _joined(joined), nxt
        joined.append(nxt)
    return _joined(joined), None


def _joined(outs: list[StepOutput]) -> StepOutput:
    """Consecutive outputs of one request as one: the last one's state, everyone's tokens, text and logprobs."""
    if len(outs) == 1:
        return outs[0]
    return replace(outs[-1], token_ids=[t for o in outs for t in o.token_ids],
                   text_delta="".join(o.text_delta for o in outs),
                   logprobs=tuple(lp for o in outs for lp in o.logprobs),
                   prompt_logprobs=next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None))
