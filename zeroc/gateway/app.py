"""The FastAPI application: OpenAI's completions, chat completions, responses, models and a health check.

Every error leaves as OpenAI's {"error": {message, type, param, code}} with a matching status (the
gRPC map is in errors.py); anything unexpected is a JSON 500 whose details go to the log only. A
stream only starts (status 200) once its first item came back, so a refusal before any token
(unknown model, prompt too long, overload, no replica) keeps its own status; errors after that are
sent as an `error` event before `data: [DONE]`. A client that goes away cancels its gRPC call, so
the decode service frees the request's KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from zeroc.auth import TokenAuth
from zeroc.client import Chunk, ClientError, Result
from zeroc.gateway.chat import ChatTemplate
from zeroc.gateway.choices import all_or_none, choice_calls, merged_events, open_all, total_usage
from zeroc.gateway.errors import APIError, check_finish, from_grpc, quote
from zeroc.gateway.echo import Echo, wrap_all
from zeroc.gateway.logprobs import LogprobFormat
from zeroc.gateway.reasoning import REASONING_PARSERS, Reasoning
from zeroc.gateway.replicas import Replicas, finish
from zeroc.gateway.response_events import response_events
from zeroc.gateway.response_store import ResponseStore, Stored, owner_of
from zeroc.gateway.responses import (ResponseShape, ResponsesRequest, as_responses_error, chat_request, input_items,
                                    listed_items, unique_ids)
from zeroc.gateway.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body
from zeroc.gateway.sse import DONE, EventStream, Reply, TokenEvents, sse, wait_disconnect
from zeroc.metrics import ServiceMetrics
from zeroc.tokenizer import Tokenizer

log = logging.getLogger(__name__)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the context limit


@dataclass(frozen=True)
class ServiceLink:
    """How the gateway reaches its decode services and whom it serves: `ca` (PEM) verifies the services' TLS
    (None: plaintext), `token` is the gateway's own bearer token for its health checks ("" none), `auth` the
    deployment's tokens, checked at the edge (None: every caller is let through; the services still check)."""

    ca: bytes | None = None
    token: str = ""
    auth: TokenAuth | None = None


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    max_context: int
    tokenizer: Tokenizer
    template: ChatTemplate | None
    tool_parser: str = ""  # its tool-call syntax, for tool_choice "auto" (zeroc/gateway/tool_parsers.py); "": none
    reasoning_parser: str = ""  # its thinking syntax (zeroc/gateway/reasoning.py); "": none


async def until_disconnected(request: Request, awaitable):
    """Await `awaitable`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
    return task.result()


class Gateway:
    def __init__(self, card: ModelCard, replicas_factory, max_body_bytes: int, auth: TokenAuth | None = None,
                 store: ResponseStore | None = None):
        """`auth`: the deployment's bearer tokens (zeroc/auth.py); with them every call but /health needs one.
        `store`: where finished Responses are kept (None: nowhere; `store` and `previous_response_id` are then
        answered as the Responses API's docstring says)."""
        self.card, self.max_body, self.auth, self.store = card, max_body_bytes, auth, store
        self._factory = replicas_factory  # builds the Replicas inside the server's event loop
        self.replicas: Replicas | None = None
        self.started = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.replicas = self._factory()
        try:
            yield
        finally:
            await self.replicas.close()

    def _caller(self, request: Request) -> str:
        """The caller's bearer token ("" for none), which its decode calls carry: the decode services map it to the
        caller's tenant, whose prefix cache is its own (docs/security.md). With the deployment's token file, 401
        here unless the file knows it."""
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if self.auth is not None and self.auth.required and self.auth.tenant_of(token) is None:
            raise APIError(401, "send 'Authorization: Bearer KEY' with a key this server knows",
                           "authentication_error", code="invalid_api_key")
        return token

    async def _body(self, request: Request, model):
        """(the parsed body, the caller's token): the token checked before the body is read."""
        token = self._caller(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise APIError(413, f"the body has {declared} bytes; the limit is {self.max_body}",
                           code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body:
                raise APIError(413, f"the body is over the limit of {self.max_body} bytes", code="request_too_large")
        req = parse_body(bytes(raw), model)
        if req.model and req.model != self.card.name:
            raise APIError(404, f"the model {req.model[:64]!r} does not exist; this server serves "
                                f"{self.card.name!r}", "not_found_error", "model", "model_not_found")
        return req, token

    def _sampling(self, req, default_max: int) -> dict:
        if req.user:
            # The SDK carries no per-call metadata yet, so the tenant only reaches the log.
            log.debug("request user", extra={"user": req.user[:64]})
        return {"max_tokens": req.max_completion_tokens or req.max_tokens or default_max,
                "temperature": req.temperature if req.temperature is not None else 1.0,
                "top_p": req.top_p if req.top_p is not None else 1.0, "min_p": req.min_p or 0.0,
                "top_k": max(0, req.top_k or 0),
                "seed": None if req.seed is None else req.seed % 2**64,
                "stop": req.stop_list(), "stop_token_ids": req.stop_token_ids or [], "ignore_eos": req.ignore_eos,
                "model": self.card.name,
                "logprobs": req.logprobs_wanted(), "frequency_penalty": req.frequency_penalty or 0.0,
                "presence_penalty": req.presence_penalty or 0.0, "repetition_penalty": req.repetition_penalty or 1.0,
                "logit_bias": req.bias(), "guide": req.guide(), "skip_special_tokens": req.skip_special_tokens,
                "min_tokens": req.min_tokens or 0, "include_stop_str_in_output": req.include_stop_str_in_output,
                "priority": req.priority}

    async def completions(self, request: Request) -> Response:
        req, token = await self._body(request, CompletionRequest)
        prompts, only = req.prompts(), req.prompt_only()
        for prompt in prompts:
            if isinstance(prompt, list) and len(prompt) >= self.card.max_context:
                raise APIError(400, f"prompt: {len(prompt)} tokens; the model's context is {self.card.max_context}",
                               param="prompt", code="context_length_exceeded")
        sampling = {**self._sampling(req, COMPLETION_DEFAULT_MAX_TOKENS), "token": token}
        echoes = None
        if req.echo:  # zeroc/gateway/echo.py
            echoes = [Echo(p if isinstance(p, str) else self.card.tokenizer.decode(p), only) for p in prompts]
            sampling.update(prompt_logprobs=sampling["logprobs"], max_tokens=1 if only else sampling["max_tokens"])
        reply = Reply(f"cmpl-{uuid.uuid4().hex}", self.card.name, False, req.return_token_ids, int(time.time()),
                      self._logprobs(sampling, chat=False))
        return await self._answer(request, req, reply, prompts, sampling, echoes)

    async def chat(self, request: Request) -> Response:
        req, token = await self._body(request, ChatRequest)
        reply, ids, sampling = self._chat_call(req, token, f"chatcmpl-{uuid.uuid4().hex}")
        return await self._answer(request, req, reply, [ids], sampling)

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API: the chat request it means, answered as a Response (zeroc/gateway/responses.py)."""
        req, token = await self._body(request, ResponsesRequest)
        owner = owner_of(token)
        history = unique_ids(self._history(req.previous_response_id, owner) + input_items(req.input))
        keep = (lambda r: self._keep(owner, r, history)) if req.store and self.store is not None else None
        shape = ResponseShape(req, self.card.name, int(time.time()), keep, self._count_tokens)
        try:
            chat = chat_request(req, history)
            reply, ids, sampling = self._chat_call(chat, token, shape.id)
        except APIError as exc:
            raise as_responses_error(exc) from None
        return await self._answer(request, chat, reply, [ids], sampling, shape=shape)

    def _keep(self, owner: str, response: dict, history: list[dict]) -> None:
        if not self.store.put(owner, response, history):
            log.warning("response %s not kept: larger than the whole store (--responses-store-mb)", response["id"],
                        extra={"request_id": response["id"]})

    def _count_tokens(self, text: str) -> int:
        return len(self.card.tokenizer.encode(text, False))

    def _history(self, previous: str | None, owner: str) -> list[dict]:
        """The conversation a response continues: the earlier one's items and output. Raises APIError."""
        if previous is None:
            return []
        if self.store is None:
            raise APIError(400, "previous_response_id: this gateway keeps no responses (--responses-store-mb 0)",
                           param="previous_response_id")
        prior = self._stored(owner, previous, "previous_response_id")
        return prior.history + prior.response["output"]

    def _stored(self, owner: str, response_id: str, param: str | None = None) -> Stored:
        got = None if self.store is None else self.store.get(owner, response_id)
        if got is None:
            raise APIError(404, f"no response {quote(response_id, 64)} is kept for this key (this gateway keeps "
                                "them in memory, the least recently used dropped first)", "not_found_error", param)
        return got

    async def get_response(self, request: Request, response_id: str) -> JSONResponse:
        return JSONResponse(self._stored(owner_of(self._caller(request)), response_id).response)

    async def delete_response(self, request: Request, response_id: str) -> JSONResponse:
        owner = owner_of(self._caller(request))
        self._stored(owner, response_id)
        self.store.delete(owner, response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, request: Request, response_id: str, order: Literal["asc", "desc"] = "desc",
                          limit: int = Query(20, ge=1, le=100), after: str | None = None) -> JSONResponse:
        """The items that led to a kept response (its conversation's), a page of them, as OpenAI lists them."""
        items = listed_items(self._stored(owner_of(self._caller(request)), response_id).history, response_id)
        items = items[::-1] if order == "desc" else items
        start = next((i + 1 for i, it in enumerate(items) if it["id"] == after), 0) if after else 0
        page = items[start: start + limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)})

    def _chat_call(self, req: ChatRequest, token: str, reply_id: str) -> tuple[Reply, list[int], dict]:
        """(how the answer is shaped, the prompt's ids, the decode call's arguments) of a chat request."""
        if self.card.template is None:
            raise APIError(400, f"the model {self.card.name!r} has no chat template; use /v1/completions",
                           param="messages")
        messages = [m.as_template_input(i) for i, m in enumerate(req.messages)]
        guide, calls = req.tool_calls(reply_id, self.card.tool_parser)  # zeroc/gateway/tools.py
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        text = self.card.template.render(messages, req.add_generation_prompt, tools, req.chat_template_kwargs,
                                         req.continue_final_message)
        ids = self.card.tokenizer.encode(text, add_special_tokens=False)
        room = self.card.max_context - len(ids)
        if room < 1 or not ids:
            raise APIError(400, f"messages: {len(ids)} prompt tokens; the model's context is "
                                f"{self.card.max_context}", param="messages", code="context_length_exceeded")
        sampling = {**self._sampling(req, room), "token": token}
        if guide is not None:
            sampling["guide"] = guide
        if calls is not None and calls.parser is not None and calls.parser.keeps_special_tokens:
            sampling["skip_special_tokens"] = False  # its markers are special tokens (Mistral's), as vLLM does
        reasoning = None
        if self.card.reasoning_parser:  # zeroc/gateway/reasoning.py
            syntax = REASONING_PARSERS[self.card.reasoning_parser]
            reasoning = Reasoning(syntax, syntax.open_after(text))
            if reasoning.open and sampling["guide"] is not None:  # think freely, then answer to the guide
                sampling["guide"] = {**sampling["guide"], "after": syntax.end}
        reply = Reply(reply_id, self.card.name, True, req.return_token_ids, int(time.time()),
                      self._logprobs(sampling, chat=True), calls, reasoning)
        return reply, ids, sampling

    def _logprobs(self, sampling: dict, chat: bool) -> LogprobFormat | None:
        return None if sampling["logprobs"] is None else LogprobFormat(self.card.tokenizer, chat)

    async def _answer(self, request: Request, req, reply: Reply, prompts: list, sampling: dict,
                      echoes: list[Echo] | None = None, shape: ResponseShape | None = None) -> Response:
        """One decode call per choice (each prompt's `n`, zeroc/gateway/choices.py); one choice streams without
        merging. `echoes`: one per prompt, where completions echo them; `shape`: the Response a chat answer becomes
        (one choice)."""
        n = req.n or 1
        calls = choice_calls(sampling, prompts, n, reply.id)
        echoes = None if echoes is None else [echoes[k // n] for k in range(len(calls))]  # one per choice
        # a prompt's choices share its KV through the KV store, unless they score it (prompt_logprobs: computed whole)
        share = sampling.get("prompt_logprobs") is None
        try:
            opened = await until_disconnected(request, open_all(self.replicas, calls, n, share))
            if echoes is not None:
                opened = await until_disconnected(request, wrap_all(echoes, opened))
            if not req.stream:
                try:
                    results = await until_disconnected(request, all_or_none([finish(f, s) for f, s in opened]))
                finally:
                    await _close_all(opened)  # those whose task was cancelled before it ran
                for r in results:
                    check_finish(r.finish_reason)
                usage = total_usage(results, n)
                whole = reply.whole(results, usage)
                return JSONResponse(whole if shape is None else shape.whole(whole, usage))
        except ClientError as exc:
            raise from_grpc(exc.code, exc.details) from None
        except ClientGone:
            return Response(status_code=499)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if len(opened) > 1:
            return EventStream(merged_events(reply, opened, include_usage, n), headers=headers,
                               close=lambda: _close_all(opened))
        first, stream = opened[0]
        events = (_events(reply, first, stream, include_usage) if shape is None else
                  response_events(reply, shape, first, stream))
        return EventStream(events, headers=headers, close=stream.aclose)

    async def tokenize(self, request: Request) -> JSONResponse:
        """vLLM's /tokenize: what the model reads of a prompt, or of a chat through its template."""
        req, _ = await self._body(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        text, special = req.prompt, req.add_special_tokens is not False
        if req.messages is not None:
            if self.card.template is None:
                raise APIError(400, f"the model {self.card.name!r} has no chat template", param="messages")
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            text = self.card.template.render([m.as_template_input(i) for i, m in enumerate(req.messages)],
                                             req.add_generation_prompt, tools, req.chat_template_kwargs,
                                             req.continue_final_message)
            special = bool(req.add_special_tokens)
        tok = self.card.tokenizer
        ids = await asyncio.to_thread(tok.encode, text, special)  # up to the body's size: off the event loop
        return JSONResponse({"count": len(ids), "max_model_len": self.card.max_context, "tokens": ids,
                             "token_strs": tok.pieces(ids) if req.return_token_strs else None})

    async def detokenize(self, request: Request) -> JSONResponse:
        """vLLM's /detokenize: the text of token ids (special tokens' too); 400 for an id past the vocabulary."""
        req, _ = await self._body(request, DetokenizeRequest)
        vocab = self.card.tokenizer.vocab_size
        bad = next((t for t in req.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        text = await asyncio.to_thread(self.card.tokenizer.decode, req.tokens, False)
        return JSONResponse({"prompt": text})

    async def models(self, request: Request) -> dict:
        self._caller(request)
        return {"object": "list", "data": [{"id": self.card.name, "object": "model", "created": self.started,
                                            "owned_by": "zeroc", "max_model_len": self.card.max_context}]}

    async def ping(self) -> Response:
        """Liveness: 200 while the process serves, whatever the decode services do, and without a key."""
        return Response(status_code=200)

    async def health(self) -> Response:
        states = await self.replicas.health()
        ok = any(states.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": self.card.name,
                             "replicas": states}, status_code=200 if ok else 503)


async def _close_all(opened) -> None:
    for _, stream in opened:
        await stream.aclose()


async def _events(reply: Reply, first: Chunk | Result, stream: AsyncIterator[Chunk | Result],
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The stream's events, each token's its own `data:` event; events that are ready together (the
    chat role and the first token; the finish, usage and [DONE]) leave in one write."""
    tokens = TokenEvents(reply)
    head = sse(reply.role_chunk()) if reply.chat else b""
    try:
        item = first
        while isinstance(item, Chunk):
            yield head + tokens.item(item)
            head = b""
            item = await stream.__anext__()
        check_finish(item.finish_reason)
        tail = head + sse(reply.chunk("", [], item.finish_reason))
        if include_usage:
            tail += sse(reply.usage_chunk(item.usage))
    except ClientError as exc:
        tail = head + sse(from_grpc(exc.code, exc.details).body())
    except APIError as exc:
        tail = head + sse(exc.body())
    except Exception:  # the status line is gone: the error goes in the stream, the traceback to the log
        log.exception("stream failed", extra={"request_id": reply.id})
        tail = head + sse(APIError(500, "internal error", "internal_error").body())
    finally:
        await stream.aclose()
    yield tail + DONE


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, f"invalid request: {str(exc.errors()[:1])[:200]}"))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), kind))

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        return _error_response(APIError(500, "internal error; the gateway's log has the details", "internal_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal)


def create_app(card: ModelCard, targets: list[str], timeout_s: float | None, max_body_bytes: int,
               metrics: ServiceMetrics | None = None, routing: str = "round_robin", link: ServiceLink = ServiceLink(),
               store_bytes: int = 64 << 20) -> FastAPI:
    """The app; `metrics`: where its series go (the caller serves them, see zeroc.metrics); `routing`: how a call
    picks its decode service (zeroc/gateway/replicas.py); `link`: how it reaches them and whom it lets in;
    `store_bytes`: the memory kept Responses may take (0: none are kept)."""
    metrics = metrics or ServiceMetrics()
    gw = Gateway(card, lambda: Replicas(targets, timeout_s, metrics=metrics, routing=routing, ca=link.ca,
                                        token=link.token), max_body_bytes, link.auth,
                 ResponseStore(store_bytes) if store_bytes > 0 else None)
    app = FastAPI(title="ZeroC gateway", description="OpenAI-compatible API over the ZeroC decode services",
                  lifespan=gw.lifespan)
    install_error_handlers(app)
    app.add_api_route("/v1/completions", gw.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", gw.chat, methods=["POST"])
    app.add_api_route("/v1/responses", gw.responses, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", gw.get_response, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", gw.delete_response, methods=["DELETE"])
    app.add_api_route("/v1/responses/{response_id}/input_items", gw.input_items, methods=["GET"])
    app.add_api_route("/v1/models", gw.models, methods=["GET"])
    app.add_api_route("/tokenize", gw.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", gw.detokenize, methods=["POST"])
    app.add_api_route("/health", gw.health, methods=["GET"])
    app.add_api_route("/ping", gw.ping, methods=["GET"])
    app.state.gateway = gw
    return app
