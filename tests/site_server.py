"""What the serving tests share: a site home with two versions and a key per role, and a real server on 127.0.0.1.

``running(settings)`` starts the app under :mod:`serving.server`'s uvicorn
configuration (the connection guard included) on a port the test picks and
always stops it; ``serve_process`` does the same in a child process, for
tests that send signals or exhaust file descriptors.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from fedmeta.data import Schema, load_site
from fedmeta.personalize import load_base, personalize, publish, register_base
from fedmeta.registry import SiteHome
from serving import ServingSettings, create_app
from serving.auth import KeyStore
from serving.server import DrainingServer, uvicorn_config

ROW = {
    "age": 71, "sex": "F", "admission_type": "emergency", "ward": "cardiology", "prior_admissions": 2, "charlson_index": 4,
    "heart_rate": 96, "systolic_bp": 118, "creatinine": 1.4, "hemoglobin": 11.2, "sodium": 136, "wbc": 9.8,
}
SITE = "hospital_002"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(settings: ServingSettings):
    """A real uvicorn server for ``create_app(settings)`` on a free 127.0.0.1 port, stopped on exit."""
    app = create_app(settings)
    port = free_port()
    server = DrainingServer(uvicorn_config(app, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "server did not stop"


@contextmanager
def serve_process(home: SiteHome, *settings: str, nofile: int | None = None):
    """``python -m serving`` in a child process on a free port; yields (url, process); always stopped."""
    port = free_port()
    args = [sys.executable, "-m", "serving", "--site-home", str(home.path), "--port", str(port)]
    for item in settings:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

    def limit():
        if nofile is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: an unread pipe would block the server's logging
    process = subprocess.Popen(args, env=env, stdout=log, stderr=log, text=True, preexec_fn=limit)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, f"server exited: {_read(log)}"
            assert time.time() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/v2/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def _read(log) -> str:
    log.seek(0)
    return log.read()


def publish_version(home: SiteHome, hospitals: Path, base_run: Path, seed: int, promote: bool):
    base = load_base(base_run)
    site = load_site(hospitals / f"{SITE}.csv", base.schema_for(Schema.load(hospitals / "schema.json")))
    result = personalize(base.for_schema(site.schema), site, shots=5, steps=3, lr=0.05, seed=seed)
    base_version = register_base(home, base)
    return publish(home, result.model, "personalized", SITE, base_version, base_version, result.metrics, {}, {}, shots=5, personalized_tasks=result.tasks, promote=promote,
                   feature_ranges=site.feature_ranges()).version


@pytest.fixture()
def site_home(tmp_path, hospitals, base_run):
    """A site home with two personalized versions (v2 promoted, v3 not) and one key per role."""
    home = SiteHome(tmp_path / "home")
    publish_version(home, hospitals, base_run, seed=1, promote=True)
    publish_version(home, hospitals, base_run, seed=2, promote=False)
    keys = {role: KeyStore(home.path).create(f"{role}-app", role)[1] for role in ("predict", "department", "admin")}
    return home, keys


PATH_VALUES = {"name": SITE, "version": "v3", "job_id": "0123456789ab"}  # fills every served route's path parameters


def served_routes(app) -> set[str]:
    """Every route the app answers, as ``"GET /path"``: the documented ones and those outside the document."""
    documented = {f"{method.upper()} {path}" for path, operations in app.openapi()["paths"].items() for method in operations}
    outside = {f"{method} {route.path}" for route in app.routes for method in (getattr(route, "methods", None) or set()) - {"HEAD"}}
    return documented | outside


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def settings(home: SiteHome, **kw) -> ServingSettings:
    return ServingSettings(site_home=home.path, **kw)


def direct_onnx(home: SiteHome, version: int, feed: dict) -> list[np.ndarray]:
    _, data = home.load(home.registry.get(version))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def sepsis_rows(n=80):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        wbc = float(np.round(rng.lognormal(2.1, 0.35), 1))
        rows.append({**ROW, "age": int(rng.integers(20, 95)), "wbc": wbc, "sepsis": "yes" if wbc > 8.5 else "no"})
    return rows


def wait_for_job(url: str, job_url: str, key: str, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while (job := httpx.get(url + job_url, headers=auth(key)).json())["status"] in ("queued", "running"):
        assert time.time() < deadline, job
        time.sleep(0.2)
    return job
