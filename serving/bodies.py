"""Reading a JSON request body without letting the client choose what it costs.

Every route with a body reads it through :func:`read_json`, which refuses,
before parsing anything:

- a ``Content-Type`` other than JSON (415), and any ``Content-Encoding``
  but ``identity`` (415: the server does not inflate bodies, so a gzip bomb
  costs nothing);
- a body over ``max_body_bytes`` (413), whether declared or chunked;
- a body with more arrays and objects than any valid request needs (413):
  parse cost grows with the number of containers, not the byte count. A
  4 MiB body of nested ``[]`` makes two million lists, 0.6 s of orjson on
  the event loop; the count is ``bytes.count``, ~1 ms for 4 MiB;
- nesting deeper than :data:`MAX_DEPTH` (422). No request body of this API
  is deeper than 4 levels.

The counts do not know about JSON strings, so brackets inside strings count
too: the limits are upper bounds chosen far above what valid bodies use.
"""

from __future__ import annotations

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request

from serving.errors import ApiError

MAX_DEPTH = 32
_OPEN = (91, 123)  # '[' and '{'
_CLOSE = (93, 125)


def _declared_length(request: Request) -> int | None:
    """Checks Content-Type and Content-Encoding and returns Content-Length, in one pass over the raw headers."""
    content_type = encoding = length = None
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = value
        elif name == b"content-encoding":
            encoding = value
    if content_type is None:
        raise ApiError(415, "Content-Type: missing; send 'Content-Type: application/json'")
    media = content_type.split(b";", 1)[0].strip().lower()
    if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
        raise ApiError(415, f"Content-Type: unsupported media type {media[:64].decode('latin-1')!r}; send 'application/json'")
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        raise ApiError(415, f"Content-Encoding: unsupported encoding {encoding[:32].decode('latin-1')!r}; send the body uncompressed")
    return int(length) if length is not None and length.isdigit() else None


def nesting_depth(body: bytes) -> int:
    """The deepest bracket nesting in ``body`` (strings not excluded: an upper bound).

    >>> nesting_depth(b'{"rows": [{"age": 3}]}')
    3
    """
    codes = np.frombuffer(body, np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def parse_json(body: bytes, max_containers: int) -> object:
    """``body`` parsed with orjson, after bounding its container count and depth."""
    containers = body.count(b"[") + body.count(b"{")
    if containers > max_containers:
        raise ApiError(413, f"body: {containers} JSON arrays and objects exceed the limit of {max_containers}")
    if containers > MAX_DEPTH and nesting_depth(body) > MAX_DEPTH:
        raise ApiError(422, f"body: JSON nested deeper than {MAX_DEPTH} levels; requests of this API need at most 4")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if any(token in body for token in (b"NaN", b"Infinity")):
            raise ApiError(422, "NaN and Infinity are not valid feature values (and not valid JSON); send a number") from None
        raise ApiError(400, f"body is not valid JSON: {e}") from None


async def read_json(request: Request, limit: int, max_containers: int) -> object:
    """The request body parsed with orjson, refusing what :mod:`serving.bodies` describes before parsing."""
    length = _declared_length(request)
    if length is not None and length > limit:
        raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
    return parse_json(await _read_bounded(request, limit), max_containers)


async def _read_bounded(request: Request, limit: int) -> bytes:
    """The body, declared or chunked, read up to ``limit`` bytes.

    Straight from the ASGI messages: Starlette's ``Request.body()`` goes through an async
    generator, ~1.4 us more for a one-message body. As there, a disconnect raises
    ``ClientDisconnect``, and the body is kept on the request for a later ``body()``.
    """
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # Starlette's cache: Request.body() returns it instead of waiting on a spent stream
    return body
