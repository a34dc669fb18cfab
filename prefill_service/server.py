"""The PrefillService servicer (a thin gRPC edge over `PrefillWorker`) and the process entry point."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import grpc
import torch
from prometheus_client import Histogram

from kv_store.peer import SERVICE_NAME as KV_SERVICE_NAME
from kv_store.peer import KvStoreServicer
from kv_store.service import attach_store, set_store_health, store_snapshot
from prefill_service.sp_worker import SpPrefillWorker
from prefill_service.worker import DONE, PrefillJob, PrefillWorker
from zeroc.caches import kv_footprint
from zeroc.config import ZeroCConfig
from zeroc.kv_transfer import KvTransferError, add_prefill_service, model_fingerprint
from zeroc.loader import LoadedModel, load_model
from zeroc.metrics import REQUEST_BUCKETS, ServiceMetrics, cache_source, load_families, serve_metrics, store_families
from zeroc.rpc import CallCounter, ServiceHost, add_servicer, check_id, quote
from zeroc.stream_mac import request_key, stream_key
from zeroc.tls import require_service
from zeroc.transport.landing import kv_fingerprint
from zeroc.transport.capability import GRPC, probe
from zeroc.transport.nccl import load_nccl
from zeroc.transport.prefill_side import KvTransportService
from zeroc.v1 import kv_store_pb2_grpc, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    """Registered before the model loads (answering UNAVAILABLE) so health is reachable meanwhile."""

    def __init__(self, max_queue: int, default_chunk_bytes: int, draining: threading.Event,
                 kv: KvTransportService, transfer_timeout_s: float, max_message_bytes: int = 16 << 20,
                 allow_plaintext: str = "loopback", mac_key: bytes | None = None,
                 metrics: ServiceMetrics | None = None):
        self.max_queue, self.default_chunk_bytes, self.draining = max_queue, default_chunk_bytes, draining
        # A chunk plus its metadata must fit one message, whatever chunk size the caller asks for.
        self.max_chunk_bytes = max(1024, max_message_bytes - (64 << 10))
        self.kv, self.transfer_timeout_s = kv, transfer_timeout_s
        self.calls = CallCounter()
        self.allow_plaintext = allow_plaintext  # who may call without mTLS (SecurityConfig)
        self.mac_key = mac_key  # MACs the chunks it sends (zeroc.stream_mac); None without a cluster key
        self.worker: PrefillWorker | None = None
        self.metrics = metrics or ServiceMetrics()
        self.prefill_time = Histogram("zeroc:request_prefill_time_seconds", "Time from a Prefill call's arrival to "
                                      "its last KV sent.", buckets=REQUEST_BUCKETS, registry=self.metrics.registry)

    def attach(self, loaded: LoadedModel, worker: PrefillWorker, fingerprint: str) -> None:
        self.vocab_size, self.fingerprint = loaded.config.vocab_size, fingerprint
        self.kv.fingerprint = fingerprint
        self.worker = worker

    def _job(self, request: prefill_pb2.PrefillRequest, context: grpc.ServicerContext) -> PrefillJob:
        require_service(context, self.allow_plaintext)
        if self.worker is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down")
        check_id("request_id", request.request_id, context)
        check_id("model_fingerprint", request.model_fingerprint, context)
        check_id("link_id", request.link_id, context)
        check_id("tenant", request.tenant, context)
        ids = list(request.token_ids)
        if not ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token_ids is empty")
        if any(t >= self.vocab_size for t in ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be < {self.vocab_size}")
        if len(ids) > self.worker.max_tokens:
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"{len(ids)} tokens; this prefill service takes at most {self.worker.max_tokens}")
        if request.model_fingerprint and request.model_fingerprint != self.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"model fingerprint {quote(request.model_fingerprint)} does not match this service's "
                          f"{self.fingerprint}")
        if request.cached_prefix_tokens >= len(ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cached_prefix_tokens ({request.cached_prefix_tokens}) "
                                                            f"must be less than the {len(ids)} token ids")
        if self.worker.pending() >= self.max_queue:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill queue is full ({self.max_queue})")
        chunk = min(request.max_chunk_bytes or self.default_chunk_bytes, self.max_chunk_bytes)
        key = request_key(self.mac_key, request.request_id, ids, request.cached_prefix_tokens) \
            if self.mac_key else None
        try:
            sink = self.kv.sink_for(request, key)
        except KvTransferError as exc:
            context.abort(exc.code, str(exc))
        # Internal ids are unique so a caller reusing its request id cannot collide in the cache.
        return PrefillJob(f"{request.request_id or 'prefill'}#{uuid.uuid4().hex[:8]}", ids, max(1024, chunk),
                          request.cached_prefix_tokens, sink=sink, tenant=request.tenant, mac_key=key,
                          priority=request.priority)

    def Prefill(self, request, context):
        arrived = time.monotonic()
        job = self._job(request, context)
        self.calls.enter(context)
        context.add_callback(job.cancelled.set)
        if job.sink is not None:
            context.add_callback(job.sink.close)
        self.worker.submit(job)
        while True:
            try:
                item = job.out.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is DONE:
                break
            if isinstance(item, KvTransferError):
                context.abort(item.code, str(item))
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {quote(item, 200)}")
            yield item
        if job.sink is not None:
            self._finish_out_of_band(job, context)
        self.metrics.prompt_tokens.inc(len(job.token_ids))
        self.metrics.kv_bytes(job.sink.kind if job.sink is not None else GRPC, "sent", job.kv_bytes)
        self.prefill_time.observe(time.monotonic() - arrived)
        yield prefill_pb2.PrefillResponse(summary=prefill_pb2.PrefillSummary(
            num_tokens=len(job.token_ids), num_layers=self.worker.num_layers, kv_bytes=job.kv_bytes))


    def _finish_out_of_band(self, job: PrefillJob, context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        try:
            job.sink.finish(min(self.transfer_timeout_s, remaining) if remaining else self.transfer_timeout_s)
        except KvTransferError as exc:
            context.abort(exc.code, str(exc))

    # -- out-of-band KV transports (zeroc/transport/prefill_side.py) --------------------------------
    def GetKvCapability(self, request, context):
        require_service(context, self.allow_plaintext)
        return self.kv.get_capability(request, context)

    def OpenKvLink(self, request, context):
        require_service(context, self.allow_plaintext)
        yield from self.kv.open_link(request, context, self.transfer_timeout_s)


def watch_prefill(servicer: PrefillServicer, worker, store, loaded: LoadedModel, cfg: ZeroCConfig) -> None:
    """The series a prefill service reads at scrape time: its queue, its cache (one worker), its KV store."""
    def load():
        waiting = worker.pending()
        return load_families(max(0, servicer.calls.count() - waiting), waiting)

    servicer.metrics.watch(load)
    if isinstance(worker, PrefillWorker):  # sequence-parallel ranks hold their caches in other processes
        servicer.metrics.watch(cache_source(worker.cache, kv_footprint(worker.cache, loaded.config, cfg.cache)))
    servicer.metrics.watch(lambda: store_families(store_snapshot(store)))


def serve(cfg: ZeroCConfig, ready=print) -> None:
    """Listen first (health NOT_SERVING), load the model, then serve until SIGTERM."""
    capability = probe(cfg.device, cfg.transfer.kv_transport)  # ZeroCError (exit 2) if nccl is demanded and absent
    host = ServiceHost(cfg.server, [SERVICE_NAME, KV_SERVICE_NAME], cfg.security)
    kv = KvTransportService(capability, torch.device(cfg.device), load_nccl() if capability.nccl_version else None,
                            host.draining, out_of_band_mac=cfg.security.out_of_band_mac == "on")
    servicer = PrefillServicer(cfg.server.max_queue, cfg.transfer.chunk_bytes, host.draining, kv,
                               cfg.transfer.timeout_s, cfg.server.max_message_mb << 20, cfg.security.allow_plaintext,
                               stream_key(cfg.security), ServiceMetrics())
    add_prefill_service(servicer, host.server)
    kv_servicer = KvStoreServicer(cfg.transfer.chunk_bytes, cfg.server.max_message_mb << 20, cfg.store,
                                  cfg.security.allow_plaintext)
    add_servicer(kv_store_pb2_grpc.add_KvStoreServiceServicer_to_server, kv_servicer, host.server)
    store = metrics_server = None
    try:
        host.install_signal_handlers()
        host.start()
        metrics_server = serve_metrics(servicer.metrics, cfg.server.host, cfg.metrics.port)
        ready(f"prefill service {host.listening}")
        loaded = load_model(cfg.model_dir, cfg.dtype, cfg.device, cfg.attention_backend, cfg.pack_weights)
        fingerprint = kv_fingerprint(model_fingerprint(cfg.model_dir), cfg.cache)
        if cfg.parallel.sp_ranks > 1:  # no prefix reuse across SP ranks: the store is not attached
            worker = SpPrefillWorker(loaded, cfg.parallel.sp_ranks, cfg.dtype, cfg.transfer.timeout_s, cfg.threads)
        else:
            store = attach_store(cfg, loaded, fingerprint, host, kv_servicer)
            worker = PrefillWorker(loaded, cfg.cache, cfg.scheduler, store.store if store else None, cfg.threads,
                                   release_weights=True)  # this process owns its model
        servicer.attach(loaded, worker, fingerprint)
        watch_prefill(servicer, worker, store.store if store else None, loaded, cfg)
        host.set_serving()
        if store is not None:
            set_store_health(host, store.store.state)
        log.info("serving", extra={"service": "prefill", "address": host.address, "model": cfg.model_dir,
                                   "kv_transports": list(capability.transports),
                                   "attention_backend": loaded.model.backend.name})
        host.wait_and_drain(worker.stop, servicer.calls.busy)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        kv.close()
        host.server.stop(0)
        if store is not None:
            store.close()
