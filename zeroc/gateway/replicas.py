"""The decode services behind the gateway: one SDK client each, taken round-robin or by prompt prefix.

`routing` picks each call's order of replicas:
- "round_robin": the next one in turn;
- "prefix": the prompt's first PREFIX_TOKENS token ids (or PREFIX_CHARS characters of a text prompt) rank the
  replicas by rendezvous hashing, so requests that share a prefix (a system prompt, few-shot examples) go to the
  replica that already holds its KV blocks rather than fetch them from a peer or compute them again (SGLang's
  router and Dynamo's route on the same idea); a replica more than `slack` calls busier than the least busy one
  is passed over, so a hot prefix cannot pile a whole load on one replica. Adding or removing a replica moves
  only the prefixes that hash to it.
A replica that answers UNAVAILABLE before its first token (down, loading, draining) is skipped for
the next one in the order; once every replica has refused, the gateway backs off (the SDK's `RetryPolicy`) and
goes round again. Tokens are never retried once they flowed: the caller already has them.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from typing import AsyncIterator

import grpc

from zeroc.client import AsyncClient, Chunk, ClientError, Result, RetryPolicy, collect
from zeroc.metrics import ServiceMetrics, TokenClock, gauge

ROUTINGS = ("round_robin", "prefix")
PREFIX_TOKENS = 256  # sixteen 16-token KV blocks: a system prompt's worth
PREFIX_CHARS = 1024  # about as many tokens of a text prompt (the gateway sends completions' text as it came)


def prefix_key(prompt: str | list[int]) -> bytes:
    """What a prompt's route depends on: its first PREFIX_TOKENS ids, or PREFIX_CHARS characters."""
    if isinstance(prompt, str):
        return b"s" + prompt[:PREFIX_CHARS].encode("utf-8", "surrogatepass")
    return b"t" + b",".join(b"%d" % t for t in prompt[:PREFIX_TOKENS])


def rendezvous(key: bytes, targets: list[str]) -> list[int]:
    """Indices of `targets` in the key's order (highest random weight first): each target's rank for a key depends
    on the two alone, so a target added or removed moves only the keys that rank it first."""
    score = [hashlib.blake2b(key, key=t.encode()[:64], digest_size=8).digest() for t in targets]
    return sorted(range(len(targets)), key=lambda i: score[i], reverse=True)


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
                 metrics: ServiceMetrics | None = None, routing: str = "round_robin", slack: int = 4,
                 ca: bytes | None = None, token: str = ""):
        """`ca`: PEM of the CA that signed the services' certificates (None: plaintext); `token`: the bearer token
        of the gateway's own calls (health), not of the calls it makes for its callers (each passes its own)."""
        if not targets:
            raise ValueError("targets: at least one decode service address is needed")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.routing, self.slack = routing, slack
        self.busy = [0] * len(targets)  # each replica's open calls
        # Each client tries once: failing over to another replica beats retrying the one that refused.
        self.clients = [AsyncClient(t, timeout=timeout_s, retry=RetryPolicy(attempts=1), token=token or None, ca=ca)
                        for t in targets]
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
            replica, first, rest = await self._open(prompt, **kwargs)
        except BaseException:
            self.open_calls -= 1
            raise
        clock = TokenClock(self.metrics, arrived)
        self._record(first, clock, arrived)
        return first, self._observe(rest, clock, arrived, replica)

    def _record(self, item: Chunk | Result, clock: TokenClock, arrived: float) -> Chunk | Result:
        if isinstance(item, Chunk):
            clock.tokens(len(item.token_ids), time.monotonic())
        else:
            self.metrics.prompt_tokens.inc(item.usage.prompt_tokens)
            self.metrics.finished(item.finish_reason, time.monotonic() - arrived)
        return item

    async def _observe(self, rest: AsyncIterator[Chunk | Result], clock: TokenClock, arrived: float, replica: int
                       ) -> AsyncIterator[Chunk | Result]:
        """The rest of a stream of `replica`, recorded, counted among its busy calls until it is closed."""
        try:
            async for item in rest:
                yield self._record(item, clock, arrived)
        finally:
            self.open_calls -= 1
            self.busy[replica] -= 1
            await rest.aclose()

    def order(self, prompt: str | list[int]) -> list[int]:
        """The replicas to try for `prompt`, first choice first (`routing`)."""
        n = len(self.clients)
        if self.routing == "round_robin":
            first = next(self._turn)
            return [(first + i) % n for i in range(n)]
        ranked = rendezvous(prefix_key(prompt), [c.target for c in self.clients])
        least = min(self.busy)
        return sorted(ranked, key=lambda i: self.busy[i] > least + self.slack)  # stable: the busy ones last

    async def _open(self, prompt: str | list[int], **kwargs
                    ) -> tuple[int, Chunk | Result, AsyncIterator[Chunk | Result]]:
        """(the replica that took the call, its first item, the rest); the replica's busy count holds the call from
        here until `_observe` closes it."""
        delays = self.retry.delays()
        while True:
            for i in self.order(prompt):
                stream = self.clients[i].stream(prompt, **kwargs)
                self.busy[i] += 1
                try:
                    return i, await stream.__anext__(), stream
                except BaseException as exc:
                    self.busy[i] -= 1
                    await stream.aclose()
                    if not isinstance(exc, ClientError) or exc.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                    refused = exc
            delay = next(delays, None)  # every replica refused
            if delay is None:
                raise refused
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
