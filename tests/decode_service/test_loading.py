"""Health says SERVING only once the model is loaded; until then calls get UNAVAILABLE."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_service.server import DecodeService
from zeroc.client import Client, ClientError, RetryPolicy
from zeroc.config import ZeroCConfig


def test_serving_only_after_the_model_is_loaded():
    svc = DecodeService(ZeroCConfig.from_env(env={}, server={"port": 0}, cache={"num_blocks": 64}))
    try:
        target = svc.start()  # listening, model not loaded yet
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service="zeroc.v1.GenerationService"),  # noqa: E731
                                     timeout=10).status
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with Client(target, retry=RetryPolicy(attempts=1)) as c:
            with pytest.raises(ClientError) as err:
                c.generate("too early", max_tokens=2)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details
            svc.load()
            assert check() == health_pb2.HealthCheckResponse.SERVING
            assert len(c.generate("now", max_tokens=2, ignore_eos=True).token_ids) == 2
            assert c.model_info().kv_blocks_total == 64
    finally:
        svc.close()
