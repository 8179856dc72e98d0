"""The FastAPI app: OpenAI's chat and completions endpoints over ``Engine.submit``, async end to end.

One ``Server`` holds the state the endpoints share: the engine (None while it loads), the
draining flag (set on SIGTERM), the media policy and the metrics. Every request goes:
ready? -> body within the byte limit -> JSON -> model name -> parameters -> media fetched under
the policy -> ``engine.submit`` -> preprocessed (input errors are a 400 here, before any
response byte) -> the answer, whole or as Server-Sent Events. A client that goes away cancels
its request; its slot is free at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..runtime.generation import Completion
from .media import MediaPolicy
from .metrics import Metrics
from .protocol import (
    APIError,
    Reply,
    api_error,
    completion_prompt,
    constraint,
    engine_messages,
    parse_body,
    sampling_params,
    stream_options,
)
from .tools import ToolCallText, tool_choice

log = logging.getLogger("ovfast.serve")


@dataclass
class ServerConfig:
    model: str  # what the engine loads (Hub id or directory)
    served_model_name: str | None = None  # the name clients use (default: ``model``)
    api_key: str | None = None
    max_request_bytes: int = 64 << 20
    media: MediaPolicy = field(default_factory=MediaPolicy)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class Server:
    def __init__(self, config: ServerConfig, engine=None, loader: Callable | None = None):
        self.config = config
        self.engine = engine
        self.loader = loader  # () -> Engine, run on a thread at startup when no engine is given
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None
        self.draining = False  # set by drain(): new requests get 503, /health 503
        self.requests = 0  # HTTP requests being answered (counted by ``counting``; the drain waits for 0)
        self._handles: set = set()  # the engine requests being answered (in ``_wait`` and ``_events``)
        self._cancelling = False  # the grace period is over: every request still answered is cancelled
        self.metrics = Metrics(self.stats)

    def stats(self):
        return self.engine.stats() if self.engine is not None else {
            "running": 0, "waiting": 0, "kv_tokens_used": 0, "kv_tokens_total": 1}

    # --- checks ------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="draining")
        if self.engine is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, "service_unavailable", code="loading", headers={"Retry-After": "5"})

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():  # ClientDisconnect if the client leaves mid-upload
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        body = parse_body(bytes(data))
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or model not in (self.config.name, self.config.model)):
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.config.name!r}",
                           param="model", code="model_not_found")
        return body

    # --- requests ------------------------------------------------------------------------------

    async def serve(self, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        reply = Reply("chat.completion" if chat else "text_completion", self.config.name)
        prompt_param = "messages" if chat else "prompt"
        handle, streaming, status, completion, constraint_param = None, False, 500, None, None
        try:
            self.check_ready()
            body = await self.body(request)
            params = sampling_params(body, chat)
            tools = tool_choice(body) if chat else None
            extra, constraint_param = constraint(body, tools.response_format() if tools else None)
            params.update(extra)
            stream, include_usage = stream_options(body)
            reply.token_bytes = self.engine.tokenizer.token_bytes
            if chat:
                messages = await engine_messages(body, self.config.media)
                handle = self.engine.submit(messages=messages, **params)
            else:
                handle = self.engine.submit(None, completion_prompt(body), chat=False, **params)
            await handle.aprepared()  # media and context errors: a 400 before any response byte
            if stream:
                streaming = True
                events = self._events(handle, reply, include_usage, t0, ToolCallText() if tools else None)
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            completion = await self._wait(request, handle)
            if completion is None:  # the client left
                status = 499
                return Response(status_code=499)
            status = 200
            call = None
            if tools:
                parsed = ToolCallText()
                parsed.feed(completion.text)
                _, call = parsed.finish()
            return JSONResponse(reply.full(completion, call))
        except ClientDisconnect:
            if handle is not None:
                handle.cancel()
            status = 499
            log.info("%s: the client disconnected before its request was read", reply.response_id)
            return Response(status_code=499)
        except BaseException as e:
            if handle is not None:
                handle.cancel()
            if not isinstance(e, Exception):
                raise  # cancelled: the client is gone
            err = api_error(e, prompt_param, constraint_param)
            status = err.status
            if status >= 500 and not isinstance(e, APIError):  # an APIError is an expected answer (503 draining)
                log.exception("%s failed", reply.response_id)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        finally:
            if not streaming:
                self._done(reply, status, completion, t0)

    async def _wait(self, request: Request, handle) -> Completion | None:
        """The completion, or None if the client disconnects first (the request is then cancelled).
        Cancelled by the drain at the end of the grace period: a 503, code "draining"."""
        self._track(handle)
        result = asyncio.ensure_future(handle.aresult())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            self._handles.discard(handle)
        if result.done():
            completion = result.result()
            if completion.finish_reason == "cancelled":
                raise APIError(503, "the server shut down before the request finished", "service_unavailable",
                               code="draining")
            return completion
        handle.cancel()
        result.cancel()
        return None

    async def _events(self, handle, reply: Reply, include_usage: bool, t0: float, tool: ToolCallText | None = None):
        """The answer as Server-Sent Events: text deltas, or with ``tool`` the deltas of one tool call."""
        status, completion = 200, None
        try:
            self._track(handle)
            yield _sse(reply.chunk("", first=True) if tool is None else reply.tool_chunk([], first=True))
            async for piece in handle:
                if tool is None:
                    yield _sse(reply.chunk(piece))
                elif deltas := tool.feed(piece):
                    yield _sse(reply.tool_chunk(deltas))
            completion = await handle.aresult()
            # "cancelled": the drain stopped it at the end of the grace period (the text so far was sent)
            finish = completion.finish_reason if completion.finish_reason in ("length", "cancelled") else "stop"
            call = None
            if tool is not None:
                deltas, call = tool.finish()
                if call is not None:
                    if deltas:
                        yield _sse(reply.tool_chunk(deltas))
                    yield _sse(reply.tool_chunk([], finish="tool_calls", logprobs=completion.logprobs))
                elif tool.name is None and completion.text:  # not a call after all (cut short): the text
                    yield _sse(reply.chunk(completion.text))
            if call is None:
                yield _sse(reply.chunk(None, finish=finish, logprobs=completion.logprobs))
            if include_usage:
                yield _sse(reply.usage_chunk(completion))
            yield "data: [DONE]\n\n"
        except Exception as e:  # after the headers: the error travels as an event
            err = api_error(e)
            status = err.status
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        except BaseException:
            status = 499  # the client disconnected
            raise
        finally:
            self._handles.discard(handle)
            handle.cancel()  # a no-op once finished; frees the slot of an abandoned stream
            self._done(reply, status, completion, t0)

    def _done(self, reply: Reply, status: int, c: Completion | None, t0: float) -> None:
        self.metrics.observe(status, c)
        tokens = f" prompt={c.prompt_tokens} completion={len(c.token_ids)} finish={c.finish_reason}" if c else ""
        log.info("%s %s status=%d%s %.0fms", reply.response_id, reply.kind, status, tokens,
                 (time.perf_counter() - t0) * 1e3)

    # --- drain (SIGTERM, Ctrl-C) -------------------------------------------------------------------

    def counting(self, app):
        """``app`` (ASGI) with the HTTP requests it is answering counted in ``self.requests``, from
        the first byte read to the last byte sent: the drain waits for that count to reach 0."""
        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            self.requests += 1
            try:
                await app(scope, receive, send)
            finally:
                self.requests -= 1
        return counted

    def _track(self, handle) -> None:
        """``handle`` is being answered (until discarded from ``_handles``); once the grace period is
        over, a request that reaches its answer only now is cancelled at once."""
        self._handles.add(handle)
        if self._cancelling:
            handle.cancel()

    async def drain(self, grace: float, hurry: asyncio.Event | None = None, settle: float = 10.0) -> None:
        """New requests get 503 (code "draining") from now on, the listener staying open. The requests
        being answered run on until they finish, for up to ``grace`` seconds (or until ``hurry`` is
        set); then each one left is cancelled: a whole answer becomes a 503 (code "draining"), a
        stream ends with a chunk of finish_reason "cancelled" and ``[DONE]``. Returns once no request
        is open, or ``settle`` seconds after the cancellation."""
        self.draining = True
        if await self._idle(grace, hurry):
            return
        log.info("%s: cancelling the %d request(s) still open", "hurried" if hurry is not None and hurry.is_set()
                 else f"grace period of {grace:g} s over", self.requests)
        self._cancelling = True
        for handle in list(self._handles):
            handle.cancel()
        if not await self._idle(settle):
            log.warning("%d request(s) still open %.0f s after their cancellation", self.requests, settle)

    async def _idle(self, timeout: float, hurry: asyncio.Event | None = None) -> bool:
        """Whether every request is answered within ``timeout`` seconds (False at once when hurried)."""
        deadline = time.monotonic() + timeout
        while self.requests > 0:
            if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
                return False
            await asyncio.sleep(0.05)
        return True


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if server.engine is None and server.loader is not None:
            task = asyncio.create_task(_load(server))
        yield
        # After the drain (main.py): every request was answered or cancelled.
        if task is not None:
            task.cancel()  # still loading: the loader's thread runs to its end, its engine unused
        engine, server.engine = server.engine, None  # closed here only, once
        if engine is not None:
            try:
                await asyncio.to_thread(engine.close)
            except asyncio.CancelledError:  # the shutdown itself was cut short: no traceback for that
                log.warning("shutdown cut short while the engine was closing")
            except Exception:
                log.exception("closing the engine failed")  # a defect: its traceback helps

    app = FastAPI(title="ovfast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        # e.headers carries 405's Allow
        return JSONResponse(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
                            .body(), status_code=e.status_code, headers=e.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            try:
                server.check_key(request)
            except APIError as e:
                return JSONResponse(e.body(), status_code=e.status)
        return await call_next(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.serve(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.serve(request, chat=False)

    @app.get("/v1/models")
    async def models():
        info = server.engine.info() if server.engine is not None else {}
        return {"object": "list", "data": [{"id": server.config.name, "object": "model", "created": 0,
                                            "owned_by": "ovfast", "max_model_len": info.get("max_seq_len")}]}

    @app.get("/health")
    async def health():
        try:
            server.check_ready()
        except APIError as e:
            return JSONResponse(e.body(), status_code=503, headers=e.headers)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _load(server: Server) -> None:
    try:
        server.engine = await asyncio.to_thread(server.loader)
        log.info("model %s loaded: %s", server.config.model, server.engine.info())
    except Exception as e:
        server.load_error = e
        log.error("the model failed to load: %s", e)
        if server.on_load_error is not None:
            server.on_load_error(e)
