"""Settings of a site's prediction server."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class ServingSettings(BaseModel):
    """Where the site's models live and the limits the server enforces.

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
    ort_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (1 is fastest for small models)")
