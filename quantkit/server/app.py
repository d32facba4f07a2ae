"""The HTTP application: OpenAI's routes over an ``AsyncEngine``.

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models
    GET  /health                GET  /metrics                 POST /tokenize, POST /detokenize

Handlers read the body themselves (so every error is in OpenAI's shape, not FastAPI's), validate
it (``generation``), and talk to the engine only through ``AsyncEngine``. ``Guard`` runs before
any handler: the API key when one is set (``/health`` and ``/metrics`` stay open, as in vLLM) and
the body-size limit (a declared ``Content-Length`` over it is refused before reading; a body
that turns out longer is cut off at the limit). No route reads or loads files.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from quantkit.server import generation
from quantkit.server.async_engine import LOADING, READY
from quantkit.server.errors import (
    AUTHENTICATION,
    APIError,
    bad_request,
    install_error_handlers,
)
from quantkit.server.generation import ServerContext
from quantkit.server.metrics import CONTENT_TYPE
from quantkit.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_body,
)

OPEN_PATHS = ("/health", "/metrics")


def build_app(ctx: ServerContext, manage_engine: bool = True) -> FastAPI:
    """The app; with ``manage_engine`` its lifespan starts the engine thread and stops it."""
    engine = ctx.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            await asyncio.to_thread(engine.stop, 30.0)

    app = FastAPI(title="quantkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.qk = ctx
    started = int(time.time())
    install_error_handlers(app, on_error=engine.metrics.record_http_error)
    app.add_middleware(Guard, api_key=ctx.settings.api_key, max_body_bytes=ctx.settings.max_body_bytes,
                       on_error=engine.metrics.record_http_error)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.state == READY and engine.accepting:
            return JSONResponse({"status": "ok"})
        status = "draining" if engine.state == READY else engine.state
        body = {"status": status}
        if engine.problem and engine.state != LOADING:
            body["detail"] = engine.problem
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        # off the event loop: with the engine in its own process, rendering is a round trip
        return Response(await asyncio.to_thread(engine.metrics.render), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [{"id": name, "object": "model", "created": started, "owned_by": "quantkit",
                 "max_model_len": engine.max_model_len or None, "vocab_size": engine.vocab_size or None,
                 "tokenizer_vocab_size": engine.tokenizer_size or None}
                for name in ctx.settings.served_names]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        return await generation.run(request, ctx, await generation.prepare_completion(ctx, req))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        return await generation.run(request, ctx, await generation.prepare_chat(ctx, req))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = parse_body(TokenizeRequest, await request.body())
        ctx.check_model(req.model)
        engine.check_serving()
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.prompt is not None:
            ids = await generation.encode_text(ctx, req.prompt)
        else:
            ids = await generation.chat_prompt(ctx, req.messages)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = parse_body(DetokenizeRequest, await request.body())
        ctx.check_model(req.model)
        engine.check_serving()
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer")
        ids = generation.check_token_ids(ctx, req.tokens, "tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(ids)})

    return app


class Guard:
    """ASGI middleware: API key (Bearer) and request-body size, before any handler runs."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, on_error=None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.key is not None and not scope["path"].startswith(OPEN_PATHS):
            problem = self._auth_problem(headers.get(b"authorization"))
            if problem is not None:
                await self._refuse(scope, receive, send, APIError(
                    401, problem, AUTHENTICATION, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._refuse(scope, receive, send, bad_request("the Content-Length header is not a number"))
                return
            if length > self.max_body_bytes:
                await self._refuse(scope, receive, send, self._too_large())
                return
        await self.app(scope, self._limited(receive), send)

    def _auth_problem(self, header: bytes | None) -> str | None:
        if header is None:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return "invalid API key"
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
                        code="request_too_large")

    def _limited(self, receive):
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._too_large()
            return message

        return limited_receive

    async def _refuse(self, scope, receive, send, error: APIError) -> None:
        if self.on_error is not None:
            self.on_error(error.status)
        await error.response()(scope, receive, send)
