"""The decode services behind the gateway: one SDK client each, taken round-robin.

A replica that answers UNAVAILABLE before its first token (down, loading, draining) is skipped for
the next one; once every replica has refused, the gateway backs off (the SDK's `RetryPolicy`) and
goes round again. Tokens are never retried once they flowed: the caller already has them. This is
the seam where a balancer that knows replica load (or gRPC's own round_robin policy over one
resolved name) can replace the plain rotation.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncIterator

import grpc

from zeroc.client import AsyncClient, Chunk, ClientError, Result, RetryPolicy, collect
from zeroc.metrics import ServiceMetrics, TokenClock, gauge


async def finish(first: Chunk | Result, stream: AsyncIterator[Chunk | Result]) -> Result:
    """The whole completion of an opened stream (`Replicas.open`), which is closed however this ends."""
    items = [first]
    try:
        async for item in stream:
            items.append(item)
    finally:
        await stream.aclose()
    return collect(items)


class Replicas:
    def __init__(self, targets: list[str], timeout_s: float | None, retry: RetryPolicy = RetryPolicy(),
                 metrics: ServiceMetrics | None = None):
        if not targets:
            raise ValueError("targets: at least one decode service address is needed")
        # Each client tries once: failing over to another replica beats retrying the one that refused.
        self.clients = [AsyncClient(t, timeout=timeout_s, retry=RetryPolicy(attempts=1)) for t in targets]
        self.retry = retry
        self._turn = itertools.cycle(range(len(self.clients)))
        self.metrics = metrics or ServiceMetrics()
        self.open_calls = 0  # streams opened and not yet closed (one event loop: no lock)
        self.metrics.watch(lambda: [gauge("zeroc:num_requests_running", "Decode calls in progress.",
                                          self.open_calls)])

    async def open(self, prompt: str | list[int], **kwargs) -> tuple[Chunk | Result, AsyncIterator[Chunk | Result]]:
        """Start a stream on the next replica that takes it: (its first item, the rest of the stream), its
        tokens and end recorded in the metrics as they pass.

        Raises ClientError: the first non-UNAVAILABLE error, or UNAVAILABLE once retries ran out."""
        arrived = time.monotonic()
        self.open_calls += 1
        try:
            first, rest = await self._open(prompt, **kwargs)
        except BaseException:
            self.open_calls -= 1
            raise
        clock = TokenClock(self.metrics, arrived)
        self._record(first, clock, arrived)
        return first, self._observe(rest, clock, arrived)

    def _record(self, item: Chunk | Result, clock: TokenClock, arrived: float) -> Chunk | Result:
        if isinstance(item, Chunk):
            clock.tokens(len(item.token_ids), time.monotonic())
        else:
            self.metrics.prompt_tokens.inc(item.usage.prompt_tokens)
            self.metrics.finished(item.finish_reason, time.monotonic() - arrived)
        return item

    async def _observe(self, rest: AsyncIterator[Chunk | Result], clock: TokenClock, arrived: float
                       ) -> AsyncIterator[Chunk | Result]:
        try:
            async for item in rest:
                yield self._record(item, clock, arrived)
        finally:
            self.open_calls -= 1
            await rest.aclose()

    async def _open(self, prompt: str | list[int], **kwargs) -> tuple[Chunk | Result, AsyncIterator[Chunk | Result]]:
        delays = self.retry.delays()
        refused = 0
        while True:
            stream = self.clients[next(self._turn)].stream(prompt, **kwargs)
            try:
                return await stream.__anext__(), stream
            except ClientError as exc:
                await stream.aclose()
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                refused += 1
                if refused % len(self.clients) == 0:
                    delay = next(delays, None)
                    if delay is None:
                        raise
                    await asyncio.sleep(delay)

    async def generate(self, prompt: str | list[int], **kwargs) -> Result:
        """The whole completion from one replica."""
        return await finish(*await self.open(prompt, **kwargs))

    async def health(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """target -> whether it answers GetModelInfo now."""
        async def one(client: AsyncClient) -> bool:
            try:
                await asyncio.wait_for(client.model_info(), timeout_s)
                return True
            except (ClientError, asyncio.TimeoutError):
                return False

        states = await asyncio.gather(*(one(c) for c in self.clients))
        return {c.target: ok for c, ok in zip(self.clients, states)}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))
