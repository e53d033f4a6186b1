"""The coordinator console: a JSON API over the run folders in one directory, and the pages that read it.

Pages (``/``, ``/runs/<name>``, ``/launch``, ``/signin``) are one HTML shell and
its script and style sheet, served by the console itself (no CDN, no build
step). They hold no data: everything comes from the API, which needs a key
(``X-API-Key`` or ``Authorization: Bearer``) from ``fedmeta keys create --role
viewer|coordinator --site-home HOME``; the browser keeps the key the sign-in
page was given in the tab's session storage.

- ``viewer``: ``GET /api/runs``, ``GET /api/runs/{name}``, ``GET /api/runs/{name}/metrics``,
  ``GET /api/whoami``, ``GET /openapi.json``;
- ``coordinator``: also ``POST /api/runs`` (launch), ``POST /api/runs/{name}/stop``
  and ``POST /api/runs/{name}/resume``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from fedmeta.console import runs as run_folders
from fedmeta.console.supervisor import LaunchError, Supervisor
from serving.auth import KeyStore
from serving.errors import ApiError

ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
#: What the pages may load: this console only (a CSP the browser enforces; tests check nothing else is asked for).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Launch(BaseModel):
    name: str = Field(..., description="the run's name: its folder under the console's runs directory")
    config: str = Field(..., description="the run configuration as TOML text (what `fedmeta train --config` reads)")
    rounds: int | None = Field(None, description="override the configuration's rounds")


def _asset(name: str) -> str:
    return resources.files("fedmeta.console").joinpath("static", name).read_text()


def create_app(runs: str | Path, site_home: str | Path) -> FastAPI:
    """The console over the run folders in ``runs``, with the keys of ``site_home``."""
    runs, keys = Path(runs), KeyStore(site_home)
    supervisor = Supervisor(runs)
    app = FastAPI(title="fedmeta console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.supervisor = supervisor

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(LaunchError)
    async def launch_error(request: Request, e: LaunchError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, e.status)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def viewer(request: Request):
        return keys.authorize(request.scope["headers"], "viewer")

    def coordinator(request: Request):
        return keys.authorize(request.scope["headers"], "coordinator")

    def run_dir(name: str) -> Path:
        try:
            run_folders.check_name(name)
        except ValueError as e:
            raise ApiError(404, str(e)) from None
        path = runs / name
        if not path.is_dir():
            raise ApiError(404, f"no run named {name!r}")
        return path

    # --- pages ------------------------------------------------------------------------------
    shell = _asset("console.html")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/launch", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/signin", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(shell)

    @app.get("/runs/{name}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(name: str) -> HTMLResponse:
        return HTMLResponse(shell)

    @app.get("/assets/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise ApiError(404, f"no asset {name!r}")
        return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    # --- API --------------------------------------------------------------------------------
    @app.get("/api/whoami")
    def whoami(key=Depends(viewer)) -> dict:
        """The key's name and role (the pages show coordinator actions to coordinators only)."""
        return {"name": key.name, "role": key.role}

    @app.get("/api/runs")
    def list_runs(key=Depends(viewer)) -> dict:
        """Every run folder in the console's directory: status, round r of R, elapsed and estimated time left, protections, ε."""
        found = sorted(p for p in runs.iterdir() if p.is_dir() and run_folders.NAME.fullmatch(p.name) and _is_run(p)) if runs.is_dir() else []
        return {"runs": [run_folders.summary(p, supervisor.launched(p.name)) for p in found]}

    @app.get("/api/runs/{name}")
    def get_run(name: str, key=Depends(viewer)) -> dict:
        """One run: its summary, sites table, privacy account, events and base models."""
        return run_folders.detail(run_dir(name), supervisor.launched(name))

    @app.get("/api/runs/{name}/metrics")
    def get_metrics(name: str, since: int = Query(0, ge=0, description="only rounds after this one"), key=Depends(viewer)) -> dict:
        """Per-round series: the training loss, and each evaluated metric (global and personalized, per task)."""
        return run_folders.series(run_dir(name), since)

    @app.post("/api/runs", status_code=202)
    def launch(body: Launch, key=Depends(coordinator)) -> dict:
        """Check the configuration as `fedmeta train` does and start the run; its folder is the runs directory's ``<name>``."""
        return supervisor.launch(body.name, body.config, body.rounds)

    @app.post("/api/runs/{name}/stop", status_code=202)
    def stop(name: str, key=Depends(coordinator)) -> dict:
        """One Ctrl-C to a run this console started: it finishes its round, keeps the checkpoint and stops."""
        return supervisor.stop(name)

    @app.post("/api/runs/{name}/resume", status_code=202)
    def resume(name: str, key=Depends(coordinator)) -> dict:
        """Continue a stopped run from its checkpoint."""
        return supervisor.resume(name)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(key=Depends(viewer)) -> dict:
        return get_openapi(title=app.title, version="1", routes=app.routes, description=__doc__)

    return app


def _is_run(path: Path) -> bool:
    return (path / "config.toml").exists() or (path / "launch.toml").exists()
