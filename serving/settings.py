"""Settings of a site's prediction server: what it serves and every bound it enforces."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class ServingSettings(BaseModel):
    """Where the site's models live and the limits the server enforces.

    The connection bounds (``max_header_bytes`` to ``shutdown_grace``) are
    applied by :func:`serving.server.run`; behind a reverse proxy, set the
    proxy's own limits no looser (the README lists them).

    >>> ServingSettings(site_home="site-home").max_rows
    1024
    """

    site_home: Path
    site: str | None = Field(None, description="the site to serve (default: the only site in the site home)")
    max_rows: int = Field(1024, ge=1, description="rows per prediction request")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request body size limit")
    head_queue_limit: int = Field(4, ge=0, description="head jobs that may wait behind the running one")
    head_max_rows: int = Field(10_000, ge=1, description="labelled rows per head request")
    reload_interval: float = Field(2.0, gt=0, description="seconds between checks for a newly promoted version")
    registry_timeout: float = Field(10.0, gt=0, description="seconds a registry read or write may wait for SQLite's lock (then 503)")
    ort_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (1 is fastest for small models)")
    docs: bool = Field(False, description="serve Swagger UI at /docs; it loads its scripts from a CDN, so it is off for offline sites")
    # connection bounds (serving.protocol)
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line plus headers, bytes (431 above)")
    header_timeout: float = Field(10.0, gt=0, description="seconds for a request head to arrive from its first byte (408)")
    body_timeout: float = Field(30.0, gt=0, description="seconds for a request body to arrive after its head")
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    max_connections: int = Field(2048, ge=8, description="open connections; above it the oldest one without a request is closed")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds to finish requests already received after SIGTERM")
