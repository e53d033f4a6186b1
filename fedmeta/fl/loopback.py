"""A Deployment Engine on 127.0.0.1: one SuperLink, one SuperNode per site, ``flwr run``.

The same commands an operator runs on real machines, started on free
loopback ports with a private ``FLWR_HOME``, and always stopped. Tests and
``benchmarks/rounds.py`` use it; it is also a way to try a deployment on one
machine::

    with LoopbackDeployment(sites=[("a.csv", "schema.json"), ("b.csv", "schema.json")]) as dep:
        dep.run(config_path="run.toml", run_dir="runs/dep")

With ``secure=True`` it runs as a production federation should: a CA and
a TLS certificate for the SuperLink (:mod:`fedmeta.fl.certs`), SuperNode
authentication, and each site's public key registered with
``flwr supernode register`` before its SuperNode starts. ``intruders``
start SuperNodes whose keys were never registered; the SuperLink refuses them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmeta.fl.certs import create_ca, create_server_certificate, create_site_key

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

    def __init__(
        self,
        sites: list[tuple[str | Path, str | Path]],
        app_dir: str | Path = PROJECT_ROOT,
        log_dir: str | Path | None = None,
        secure: bool = False,
        intruders: int = 0,
    ):
        self.sites = [(Path(d).resolve(), Path(s).resolve()) for d, s in sites]
        self.secure, self.intruders = secure, intruders
        if intruders and not secure:
            raise ValueError("intruders are only refused with secure=True (SuperNode authentication needs TLS)")
        self.app_dir = Path(app_dir)
        self.home = Path(tempfile.mkdtemp(prefix="fedmeta-flwr-home-"))
        self.log_dir = Path(log_dir) if log_dir else self.home
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.supernodes: dict[str, subprocess.Popen] = {}
        self.credentials = self.home / "credentials"
        #: Each site's home (node config ``site-home``): where the run delivers its base model.
        self.site_homes: dict[str, Path] = {}
        # The SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp by name: use this environment's.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "PATH": path}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "LoopbackDeployment":
        connection = f'address = "127.0.0.1:{self.port}"\n'
        if self.secure:
            ca = create_ca(self.credentials)
            self.server_cert, self.server_key = create_server_certificate(ca, self.credentials, ["127.0.0.1", "localhost"])
            self.ca_cert = ca.certificate
            connection += f'root-certificates = "{self.ca_cert}"\n'
        else:
            connection += "insecure = true\n"
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n{connection}')
        try:
            self._start("superlink", [_bin("flower-superlink"), *self._superlink_security(), "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
            self._wait_for_port(self.port, 30)
            for i, (data, schema) in enumerate(self.sites):
                self._start_supernode(f"supernode{i}", data, schema, register=True)
            for i in range(self.intruders):
                data, schema = self.sites[i % len(self.sites)]
                self._start_supernode(f"intruder{i}", data, schema, register=False)
        except BaseException:
            self.stop()
            raise
        return self

    def _superlink_security(self) -> list[str]:
        if not self.secure:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert), "--ssl-keyfile", str(self.server_key), "--enable-supernode-auth"]

    def _start_supernode(self, name: str, data: Path, schema: Path, register: bool) -> None:
        security = ["--insecure"]
        if self.secure:
            private, public = create_site_key(self.credentials, name)
            if register:
                self.register(public, name)
            security = ["--root-certificates", str(self.ca_cert), "--auth-supernode-private-key", str(private)]
        self.site_homes[name] = self.home / "sites" / name
        node_config = f'data-path="{data}" schema-path="{schema}" site-name="{data.stem}" site-home="{self.site_homes[name]}"'
        self.supernodes[name] = self._start(
            name,
            [_bin("flower-supernode"), *security, "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config],
        )

    def register(self, public_key: Path, name: str) -> None:
        """``flwr supernode register``: the coordinator admits the holder of this key."""
        result = subprocess.run([_bin("flwr"), "supernode", "register", str(public_key), "loopback", "--name", name], env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"registering {name}'s key failed: {result.stdout}{result.stderr}")

    def online_nodes(self) -> list[dict]:
        """The SuperLink's view of its SuperNodes (``flwr supernode list``), as dicts with ``status``."""
        result = subprocess.run([_bin("flwr"), "supernode", "list", "loopback", "--format", "json"], env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return [n for n in json.loads(result.stdout)["nodes"] if n["status"] == "online"]
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr supernode list failed: {result.stdout}{result.stderr}") from None

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

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
            try:  # children the leader left behind (flower-superexec, flwr-clientapp)
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
