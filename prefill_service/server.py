"""The PrefillService servicer (a thin gRPC edge over `PrefillWorker`) and the process entry point."""

from __future__ import annotations

import logging
import queue
import threading
import uuid

import grpc

from prefill_service.worker import DONE, PrefillJob, PrefillWorker
from zeroc.config import ZeroCConfig
from zeroc.kv_transfer import model_fingerprint
from zeroc.loader import LoadedModel, load_model
from zeroc.rpc import CallCounter, ServiceHost
from zeroc.serving_policies.transfer import kv_fingerprint
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    """Registered before the model loads (answering UNAVAILABLE) so health is reachable meanwhile."""

    def __init__(self, max_queue: int, default_chunk_bytes: int, draining: threading.Event):
        self.max_queue, self.default_chunk_bytes, self.draining = max_queue, default_chunk_bytes, draining
        self.calls = CallCounter()
        self.worker: PrefillWorker | None = None

    def attach(self, loaded: LoadedModel, worker: PrefillWorker, fingerprint: str) -> None:
        self.vocab_size, self.fingerprint = loaded.config.vocab_size, fingerprint
        self.worker = worker

    def _job(self, request: prefill_pb2.PrefillRequest, context: grpc.ServicerContext) -> PrefillJob:
        if self.worker is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down")
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
                          f"model fingerprint {request.model_fingerprint} does not match this service's "
                          f"{self.fingerprint}")
        if self.worker.pending() >= self.max_queue:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill queue is full ({self.max_queue})")
        chunk = request.max_chunk_bytes or self.default_chunk_bytes
        # Internal ids are unique so a caller reusing its request id cannot collide in the cache.
        return PrefillJob(f"{request.request_id or 'prefill'}#{uuid.uuid4().hex[:8]}", ids, max(1024, chunk))

    def Prefill(self, request, context):
        job = self._job(request, context)
        self.calls.enter(context)
        context.add_callback(job.cancelled.set)
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
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {item}")
            yield item
        yield prefill_pb2.PrefillResponse(summary=prefill_pb2.PrefillSummary(
            num_tokens=len(job.token_ids), num_layers=self.worker.cache.num_layers, kv_bytes=job.kv_bytes))


def serve(cfg: ZeroCConfig, ready=print) -> None:
    """Listen first (health NOT_SERVING), load the model, then serve until SIGTERM."""
    host = ServiceHost(cfg.server, [SERVICE_NAME])
    servicer = PrefillServicer(cfg.server.max_queue, cfg.transfer.chunk_bytes, host.draining)
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, host.server)
    try:
        host.install_signal_handlers()
        host.start()
        ready(f"prefill service listening on {host.address}")
        loaded = load_model(cfg.model_dir, cfg.dtype)
        worker = PrefillWorker(loaded, cfg.cache, cfg.scheduler)
        servicer.attach(loaded, worker, kv_fingerprint(model_fingerprint(cfg.model_dir), cfg.cache))
        host.set_serving()
        log.info("serving", extra={"service": "prefill", "address": host.address, "model": cfg.model_dir})
        host.wait_and_drain(worker.stop, servicer.calls.busy)
    finally:
        host.server.stop(0)
