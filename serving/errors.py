"""API errors: one exception type, JSON bodies ``{"error": message}``, never a stack trace.

Client input never produces a 500: every check raises :class:`ApiError`
with a 4xx and a message naming the field. A genuine server fault is
answered 500 by :func:`internal_error` and logged as one JSON line naming
the exception type and the line that raised it, never the message (it may
quote a data row) nor a traceback. A registry locked by another writer for
longer than the server's registry timeout is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import traceback

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger("fedmeta.serving")


class ApiError(Exception):
    """A client-facing failure with its HTTP status and a message that names the field and the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def shown(value: object, limit: int = 40) -> str:
    """A client's value for an error message, written as JSON (the client sent ``true``, not Python's ``True``), cut to ``limit`` characters.

    >>> shown(True), shown(None), shown("old"), shown(1e39), shown([[1]])
    ('true', 'null', '"old"', '1e+39', 'a JSON array')
    """
    if isinstance(value, (list, dict)):  # never written out: values can be megabytes deep
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, media_type="application/json", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return json_response({"error": exc.message}, exc.status, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if p != "body")
            problems.append(f"{where}: {err['msg']}" if where else err["msg"])
        return json_response({"error": "; ".join(problems)}, 422)

    @app.exception_handler(ClientDisconnect)
    async def _disconnected(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it; the metrics middleware logs and counts the disconnect

    @app.exception_handler(sqlite3.OperationalError)
    async def _registry_busy(request: Request, exc: sqlite3.OperationalError) -> Response:
        log.warning(json.dumps({"event": "registry_unavailable", "route": request.url.path, "error": str(exc)[:200]}))
        return json_response({"error": "the model registry is busy or unavailable; retry shortly"}, 503, {"Retry-After": "5"})


def internal_error(exc: BaseException, route: str) -> Response:
    """The 500 for a server fault, and its one log line (type and raising line, no message, no traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} in {frames[-1].name}" if frames else "unknown"
    log.error(json.dumps({"event": "internal_error", "route": route, "error_type": type(exc).__name__, "where": where}))
    return json_response({"error": "internal server error; the server log has the details"}, 500)
