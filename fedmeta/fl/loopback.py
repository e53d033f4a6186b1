"""A Deployment Engine on 127.0.0.1: one SuperLink, one SuperNode per site, ``flwr run``.

The same commands an operator runs on real machines, started on free
loopback ports with a private ``FLWR_HOME``, and always stopped. Tests and
``benchmarks/rounds.py`` use it; it is also a way to try a deployment on one
machine::

    with LoopbackDeployment(sites=[("a.csv", "schema.json"), ("b.csv", "schema.json")]) as dep:
        dep.run(config_path="run.toml", run_dir="runs/dep")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


class LoopbackDeployment:
    """Start a SuperLink and SuperNodes (one per ``(data_path, schema_path)``), stop them on exit."""

    def __init__(self, sites: list[tuple[str | Path, str | Path]], app_dir: str | Path = PROJECT_ROOT, log_dir: str | Path | None = None):
        self.sites = [(Path(d).resolve(), Path(s).resolve()) for d, s in sites]
        self.app_dir = Path(app_dir)
        self.home = Path(tempfile.mkdtemp(prefix="fedmeta-flwr-home-"))
        self.log_dir = Path(log_dir) if log_dir else self.home
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        # The SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp by name: use this environment's.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "PATH": path}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "LoopbackDeployment":
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        try:
            self._start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
            self._wait_for_port(self.port, 30)
            for i, (data, schema) in enumerate(self.sites):
                node_config = f'data-path="{data}" schema-path="{schema}" site-name="{data.stem}"'
                self._start(
                    f"supernode{i}",
                    [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config],
                )
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with code {p.returncode}; see {self.log_dir}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see {self.log_dir}")

    def run(self, config_path: str | Path, run_dir: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run APP loopback --stream`` with our run config; returns when the run has ended."""
        run_config = f'config-path="{Path(config_path).resolve()}" run-dir="{Path(run_dir).resolve()}"'
        return subprocess.run(
            [_bin("flwr"), "run", str(self.app_dir), "loopback", "--run-config", run_config, "--stream"],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
