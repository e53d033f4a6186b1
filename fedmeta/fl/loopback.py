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

With ``gateway=True`` (and ``secure=True``) it is the layout of
``examples/deployment/``: the SuperLink (which serves Fleet, Control and
Runtime on one port) listens for the coordinator only, and the SuperNodes
dial ``examples/deployment/coordinator/gateway.conf`` run by nginx on its own
port, which forwards the Fleet API and refuses the rest. ``supervise=True``
restarts a SuperNode that exits, as the site units' restart policy does, and
:meth:`LoopbackDeployment.restart_superlink` restarts the SuperLink with the
same command and database.
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
import threading
import time
from pathlib import Path

from fedmeta.fl.certs import create_ca, create_server_certificate, create_site_key

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GATEWAY_CONF = PROJECT_ROOT / "examples" / "deployment" / "coordinator" / "gateway.conf"
#: Seconds a supervised SuperNode waits before it is started again (the site units' RestartSec).
RESTART_DELAY = 2.0
#: Seconds a stopping SuperLink gets before SIGKILL (the unit's TimeoutStopSec). It does not exit on SIGTERM
#: while a ``flwr run --stream`` is attached (uvicorn waits for the log stream to close: ~45 s measured).
STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _processes() -> dict[int, tuple[int, str]]:
    """Each live process's parent and start time (Linux /proc): the start time tells a pid reused later apart."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = (int(fields[1]), fields[19])
        except (OSError, IndexError, ValueError):
            continue
    return found


def _tree(pid: int) -> list[tuple[int, str]]:
    """``pid`` and every process below it, as (pid, start time), whatever session or process group they moved to."""
    processes = _processes()
    found, todo = [(pid, processes.get(pid, (0, ""))[1])], [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in processes.items():
            if ppid == parent:
                found.append((child, started))
                todo.append(child)
    return found


def _signal_tree(tree: list[tuple[int, str]], sig: int) -> None:
    alive = _processes()
    for pid, started in tree:
        if pid in alive and alive[pid][1] == started:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


class LoopbackDeployment:
    """Start a SuperLink and SuperNodes (one per ``(data_path, schema_path)``), stop them on exit."""

    def __init__(
        self,
        sites: list[tuple[str | Path, str | Path]],
        app_dir: str | Path = PROJECT_ROOT,
        log_dir: str | Path | None = None,
        secure: bool = False,
        intruders: int = 0,
        gateway: bool = False,
        supervise: bool = False,
        regions: dict[str, str] | None = None,
    ):
        self.sites = [(Path(d).resolve(), Path(s).resolve()) for d, s in sites]
        #: The region each site declares in its node config (``region="..."``), by its data file's stem.
        self.regions = dict(regions or {})
        self.secure, self.intruders, self.gateway, self.supervise = secure, intruders, gateway, supervise
        if intruders and not secure:
            raise ValueError("intruders are only refused with secure=True (SuperNode authentication needs TLS)")
        if gateway and not secure:
            raise ValueError("the gateway terminates TLS with the SuperLink's certificate: use gateway=True with secure=True")
        if gateway and not shutil.which("nginx"):
            raise RuntimeError("gateway=True needs nginx on PATH (Debian: apt-get install nginx)")
        self.app_dir = Path(app_dir)
        self.home = Path(tempfile.mkdtemp(prefix="fedmeta-flwr-home-"))
        self.log_dir = Path(log_dir) if log_dir else self.home
        self.port = free_port()
        #: Where SuperNodes dial: the gateway's port, or the SuperLink's own without a gateway.
        self.fleet_port = free_port() if gateway else self.port
        #: The SuperLink's persistent state (registered keys, runs): what lets a restart keep its sites.
        self.database = self.home / "superlink" / "state.db"
        self.procs: list[subprocess.Popen] = []
        self.supernodes: dict[str, subprocess.Popen] = {}
        #: How many times the supervisor started each SuperNode again after it exited, and the exit codes it saw.
        self.restarts: dict[str, int] = {}
        self.exit_codes: dict[str, list[int]] = {}
        self._stopping = threading.Event()
        self._lock = threading.RLock()  # _supervise holds it around _start, which takes it too
        self._supervisor: threading.Thread | None = None
        self.credentials = self.home / "credentials"
        #: Each site's home (node config ``site-home``): where the run delivers its base model.
        self.site_homes: dict[str, Path] = {}
        #: Each SuperNode's public key (secure=True): what ``flwr supernode register`` admits.
        self.site_keys: dict[str, Path] = {}
        # The SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp by name: use this environment's.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "PATH": path}

    def _start(self, name: str, args: list[str], append: bool = False) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "a" if append else "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        with self._lock:
            self.procs.append(proc)
        return proc

    def __enter__(self) -> "LoopbackDeployment":
        # Two connections in FLWR_HOME: the coordinator's own (loopback, the SuperLink's port) and what a
        # site holding ca.crt can dial (the gateway's port): the probes below use the second.
        connection = f'address = "127.0.0.1:{self.port}"\n'
        site = f'address = "127.0.0.1:{self.fleet_port}"\n'
        if self.secure:
            ca = create_ca(self.credentials)
            self.server_cert, self.server_key = create_server_certificate(ca, self.credentials, ["127.0.0.1", "localhost"])
            self.ca_cert = ca.certificate
            connection += f'root-certificates = "{self.ca_cert}"\n'
            site += f'root-certificates = "{self.ca_cert}"\n'
        else:
            connection += "insecure = true\n"
            site += "insecure = true\n"
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n{connection}\n[superlink.site]\n{site}')
        self.database.parent.mkdir()
        try:
            self._start_superlink()
            if self.gateway:
                self._start_gateway()
            for i, (data, schema) in enumerate(self.sites):
                self._start_supernode(f"supernode{i}", data, schema, register=True)
            for i in range(self.intruders):
                data, schema = self.sites[i % len(self.sites)]
                self._start_supernode(f"intruder{i}", data, schema, register=False)
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="supernode-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _superlink_args(self) -> list[str]:
        """The documented coordinator command (examples/deployment/coordinator/fedmeta-superlink.service)."""
        return [_bin("flower-superlink"), *self._superlink_security(), "--database", str(self.database),
                "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"]

    def _start_superlink(self, append: bool = False) -> None:
        self.superlink = self._start("superlink", self._superlink_args(), append=append)
        self._wait_for_port(self.port, 30, self.superlink)

    def restart_superlink(self) -> float:
        """Restart the SuperLink as ``systemctl restart`` does with the shipped unit: SIGTERM to every process of
        the unit (the SuperLink, its SuperExec and any ServerApp, which run in process groups of their own), SIGKILL
        to what is left after ``STOP_TIMEOUT`` s, then the same command on the same port and database. Returns the seconds it
        was down."""
        stopped = time.monotonic()
        tree = _tree(self.superlink.pid)
        _signal_tree(tree, signal.SIGTERM)
        self._terminate(self.superlink, grace=STOP_TIMEOUT)
        _signal_tree(tree, signal.SIGKILL)
        self._start_superlink(append=True)
        return time.monotonic() - stopped

    def _start_gateway(self) -> None:
        """nginx with examples/deployment/coordinator/gateway.conf, its paths and ports moved into this deployment."""
        folder = self.home / "gateway"
        folder.mkdir()
        text = GATEWAY_CONF.read_text()
        replacements = {
            "/run/fedmeta-gateway": str(folder), "/var/log/fedmeta-gateway": str(folder), "/var/lib/fedmeta-gateway": str(folder),
            "/etc/fedmeta/superlink-tls/server.pem": str(self.server_cert), "/etc/fedmeta/superlink-tls/server.key": str(self.server_key),
            "/etc/fedmeta/federation-ca/ca.crt": str(self.ca_cert),
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{self.port};", "listen 9092 ssl;": f"listen 127.0.0.1:{self.fleet_port} ssl;",
        }
        for old, new in replacements.items():
            if old not in text:
                raise RuntimeError(f"{GATEWAY_CONF}: expected '{old}' (LoopbackDeployment moves it into its own folder)")
            text = text.replace(old, new)
        # Unprivileged: no worker user to switch to. As root, workers stay root so they can use this private folder.
        text = text.replace("user www-data;", "user root;" if os.geteuid() == 0 else "")
        conf = folder / "gateway.conf"
        conf.write_text(text)
        self.gateway_proc = self._start("gateway", ["nginx", "-p", str(folder), "-c", str(conf), "-g", "daemon off;"])
        self._wait_for_port(self.fleet_port, 30, self.gateway_proc)

    def _superlink_security(self) -> list[str]:
        if not self.secure:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert), "--ssl-keyfile", str(self.server_key), "--enable-supernode-auth"]

    def _start_supernode(self, name: str, data: Path, schema: Path, register: bool) -> None:
        security = ["--insecure"]
        if self.secure:
            private, public = create_site_key(self.credentials, name)
            self.site_keys[name] = public
            if register:
                self.register(public, name)
            security = ["--root-certificates", str(self.ca_cert), "--auth-supernode-private-key", str(private)]
        self.site_homes[name] = self.home / "sites" / name
        node_config = f'data-path="{data}" schema-path="{schema}" site-name="{data.stem}" site-home="{self.site_homes[name]}"'
        if self.regions.get(data.stem):
            node_config += f' region="{self.regions[data.stem]}"'
        args = [_bin("flower-supernode"), *security, "--superlink", f"127.0.0.1:{self.fleet_port}", "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config]
        self.supernodes[name] = self._start(name, args)

    def start_site(self, data: str | Path, schema: str | Path, register: bool = True) -> str:
        """One more SuperNode (``site<N>``), its key registered first or not; returns its name."""
        name = f"site{len(self.supernodes)}"
        self._start_supernode(name, Path(data).resolve(), Path(schema).resolve(), register=register)
        return name

    def stop_site(self, name: str) -> None:
        """Stop a SuperNode for good (``systemctl stop``): the supervisor leaves it down."""
        with self._lock:
            proc = self.supernodes.pop(name)
        self._terminate(proc)

    def kill_site(self, name: str) -> None:
        """Kill a SuperNode without warning (SIGKILL, as a crash or a pulled cable) and leave it down: the
        SuperLink learns of it only from missed heartbeats."""
        with self._lock:
            proc = self.supernodes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _supervise(self) -> None:
        """The site units' restart policy (Restart=always, RestartSec): start a SuperNode again after it exits."""
        while not self._stopping.wait(0.5):
            for name, proc in list(self.supernodes.items()):
                if proc.poll() is None or self._stopping.wait(RESTART_DELAY):
                    continue
                with self._lock:
                    if self._stopping.is_set() or self.supernodes.get(name) is not proc:  # stopping, or stop_site
                        continue
                    self.exit_codes.setdefault(name, []).append(proc.returncode)
                    self.supernodes[name] = self._start(name, list(proc.args), append=True)
                    self.restarts[name] = self.restarts.get(name, 0) + 1

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def register(self, public_key: Path, name: str, connection: str = "loopback") -> None:
        """``flwr supernode register``: the coordinator admits the holder of this key."""
        result = self._flwr("supernode", "register", str(public_key), connection, "--name", name)
        if result.returncode != 0:
            raise RuntimeError(f"registering {name}'s key failed: {result.stdout}{result.stderr}")

    def can_register_node(self, connection: str) -> bool:
        """Whether a fresh key can be registered as a node over this connection (``loopback`` or ``site``)."""
        _, public = create_site_key(self.credentials, f"probe-{connection}-{time.monotonic_ns()}")
        try:
            self.register(public, public.stem, connection)
        except RuntimeError:
            return False
        return True

    def can_start_run(self, connection: str) -> bool:
        """Whether ``flwr run`` over this connection starts a run. One that starts is stopped at once from the
        coordinator, and its config path does not exist, so its ServerApp could only fail."""
        missing = self.home / "probe" / "no-such-config.toml"
        result = self._flwr("run", str(self.app_dir), connection, "--format", "json",
                            "--run-config", f'config-path="{missing}" run-dir="{self.home / "probe" / "run"}"', timeout=120)
        try:  # with --format json, flwr run exits 0 either way and says so in "success"
            reply = json.loads(result.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"flwr run printed no JSON: {result.stdout}{result.stderr}") from None
        if not reply.get("success"):
            return False
        self._flwr("stop", str(reply["run-id"]), "loopback")
        return True

    def site_can_register_node(self) -> bool:
        """With what every site holds (ca.crt, the address it dials), can it admit a node key? Safe: False."""
        return self.can_register_node("site")

    def site_can_start_run(self) -> bool:
        """With what every site holds, can it start a run (code executed at every site)? Safe: False."""
        return self.can_start_run("site")

    def online_nodes(self) -> list[dict]:
        """The SuperLink's view of its SuperNodes (``flwr supernode list``), as dicts with ``status``."""
        result = subprocess.run([_bin("flwr"), "supernode", "list", "loopback", "--format", "json"], env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return [n for n in json.loads(result.stdout)["nodes"] if n["status"] == "online"]
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr supernode list failed: {result.stdout}{result.stderr}") from None

    def wait_online(self, count: int, timeout: float = 60) -> int:
        """Wait until ``count`` SuperNodes are online or ``timeout`` passes; the number online at the end.
        A SuperLink that does not answer yet counts as none online."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                online = len(self.online_nodes())
            except (RuntimeError, subprocess.TimeoutExpired):
                online = 0
            if online >= count or time.monotonic() > deadline:
                return online
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def _wait_for_port(self, port: int, timeout: float, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}; see {self.log_dir}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see {self.log_dir}")

    def _run_args(self, config_path: str | Path, run_dir: str | Path) -> list[str]:
        run_config = f'config-path="{Path(config_path).resolve()}" run-dir="{Path(run_dir).resolve()}"'
        return [_bin("flwr"), "run", str(self.app_dir), "loopback", "--run-config", run_config, "--stream"]

    def run(self, config_path: str | Path, run_dir: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run APP loopback --stream`` with our run config; returns when the run has ended."""
        return subprocess.run(self._run_args(config_path, run_dir), env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_run(self, config_path: str | Path, run_dir: str | Path, log: str | Path) -> subprocess.Popen:
        """:meth:`run` without waiting: its stream goes to ``log``; the caller waits for or ends the process."""
        with open(log, "w") as out:
            return subprocess.Popen(self._run_args(config_path, run_dir), stdout=out, stderr=subprocess.STDOUT, env=self.env)

    @staticmethod
    def _terminate(p: subprocess.Popen, grace: float = 10) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        try:  # children the leader left behind (flower-superexec, flwr-clientapp)
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        # The SuperExec and ServerApp under the SuperLink run in process groups of their own.
        tree = _tree(self.superlink.pid) if getattr(self, "superlink", None) else []
        _signal_tree(tree, signal.SIGTERM)
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            self._terminate(p, max(deadline - time.monotonic(), 0.1))
        _signal_tree(tree, signal.SIGKILL)
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
