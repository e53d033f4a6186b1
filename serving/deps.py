"""What routes share: the app's state, the caller's key, and bounded JSON bodies."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from serving.auth import ApiKey, KeyStore
from serving.errors import ApiError
from serving.settings import ServingSettings
from serving.store import ModelStore

# Declared for the OpenAPI docs (the "Authorize" button); the check itself is KeyStore.authorize.
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer fm_...`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or the same key in `X-API-Key`")


@dataclass
class ServerState:
    settings: ServingSettings
    store: ModelStore
    keys: KeyStore
    jobs: object  # serving.heads.HeadJobs (imported lazily: it pulls in torch)


def state(request: Request) -> ServerState:
    return request.app.state.fedmeta


# For hot routes that check the key inline (FastAPI's dependency machinery costs ~30 us per request there).
SECURITY_OPENAPI = {"security": [{"HTTPBearer": []}, {"APIKeyHeader": []}]}


def authorize(request: Request, name: str) -> ApiKey:
    return request.app.state.fedmeta.keys.authorize(request.headers, name)


def role(name: str):
    """A dependency that admits keys with at least role ``name`` and returns the key."""

    async def check(request: Request, _a=Security(_bearer), _b=Security(_header)) -> ApiKey:
        return request.app.state.fedmeta.keys.authorize(request.headers, name)

    return check


async def read_json(request: Request, limit: int) -> object:
    """The request body parsed with orjson, refusing bodies over ``limit`` bytes before reading them whole."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
    if length is not None:
        body = await request.body()  # bounded by the declared length checked above
    else:
        body = await _read_bounded(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if any(token in body for token in (b"NaN", b"Infinity")):
            raise ApiError(422, "NaN and Infinity are not valid feature values (and not valid JSON); send a number") from None
        raise ApiError(400, f"body is not valid JSON: {e}") from None


async def _read_bounded(request: Request, limit: int) -> bytes:
    """A body without a declared length (chunked), read up to ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
