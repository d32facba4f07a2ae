"""Errors the server answers with, in OpenAI's shape.

Every failure a client can see is an ``APIError``: an HTTP status and the body
``{"error": {"message", "type", "param", "code"}}`` that OpenAI's API and its client libraries use.
Handlers raise it; ``install_error_handlers`` turns it (and FastAPI's own 404/405, and any bug)
into that body, so a client never sees a traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("quantkit.server")

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def unavailable(message: str, code: str = "unavailable") -> APIError:
    return APIError(503, message, UNAVAILABLE, None, code, headers={"Retry-After": "1"})


def internal(message: str) -> APIError:
    return APIError(500, message, SERVER_ERROR, None, "internal_error")


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """APIError, unknown routes and methods, and bugs, all answered in OpenAI's shape.

    ``on_error(status)`` is called for every error response (the metrics count them)."""

    def answer(error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(error.status)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return answer(APIError(404, f"no route {request.method} {request.url.path}", NOT_FOUND,
                                   code="not_found"))
        if error.status_code == 405:
            return answer(APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                                   INVALID_REQUEST, code="method_not_allowed"))
        return answer(APIError(error.status_code, str(error.detail), INVALID_REQUEST))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error while serving %s %s", request.method, request.url.path)
        return answer(internal(f"internal error: {type(error).__name__}"))
