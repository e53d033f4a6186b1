"""Running the app: one uvicorn worker with the connection guard, JSON logs and a bounded drain.

:func:`uvicorn_config` is the one place uvicorn is configured: the guarded
protocol (:mod:`serving.protocol`) with the settings' bounds, the keep-alive
timeout, ``timeout_graceful_shutdown`` = ``shutdown_grace``, and uvicorn's
own log lines as JSON. uvicorn's ``limit_concurrency`` stays off: it counts
half-sent connections, so under a slow-client attack it would refuse the
valid ones; the guard's connection cap evicts the slow ones instead.
``max_connections`` is lowered to fit the process's file-descriptor limit.

:class:`DrainingServer` marks the app as draining when shutdown starts, so
responses carry ``Connection: close`` and clients stop reusing connections
that are about to close. Then uvicorn answers every request already
received, up to ``shutdown_grace`` seconds, and the app's lifespan cancels
a running head job (:meth:`serving.head_jobs.HeadJobs.shutdown`).

    python -m serving --site-home site-home --port 8080
"""

from __future__ import annotations

import json
import logging
import resource

import uvicorn
from fastapi import FastAPI

from serving.protocol import ConnectionLimits, GuardedHttpProtocol

log = logging.getLogger("fedmeta.serving")
FD_RESERVE = 128  # model files, SQLite, logs, the head-job pipe


def connection_cap(wanted: int) -> int:
    """``wanted``, lowered to leave :data:`FD_RESERVE` descriptors below the soft RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft - FD_RESERVE))


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, **overrides) -> uvicorn.Config:
    settings = app.state.fedmeta.settings
    cap = connection_cap(settings.max_connections)
    if cap < settings.max_connections:
        log.warning(json.dumps({"event": "max_connections_lowered", "wanted": settings.max_connections, "cap": cap, "reason": "file descriptor limit"}))
    config = uvicorn.Config(
        app, host=host, port=port, http=GuardedHttpProtocol, log_config=None, log_level="warning", access_log=False,
        timeout_keep_alive=settings.keep_alive_timeout, timeout_graceful_shutdown=int(round(settings.shutdown_grace)),
        limit_concurrency=None, server_header=False, ws="none", **overrides,
    )
    config.fedmeta_limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes, header_timeout=settings.header_timeout, body_timeout=settings.body_timeout, max_connections=cap,
    )
    return config


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app when it starts to drain."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.app = config.app

    async def shutdown(self, sockets=None) -> None:
        self.app.state.fedmeta.draining = True
        log.info(json.dumps({"event": "draining", "open_connections": len(self.server_state.connections), "grace_seconds": self.config.timeout_graceful_shutdown}))
        await super().shutdown(sockets=sockets)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then drain (see the module docstring)."""
    DrainingServer(uvicorn_config(app, host, port)).run()
