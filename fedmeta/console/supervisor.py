"""Runs the console starts, stops and resumes: each a :mod:`fedmeta.console.launcher` process it keeps an eye on.

A launch checks the name and the configuration as ``fedmeta train`` would
(errors name the field) before anything starts; the run folder then holds the
configuration as sent (``launch.toml``), the run's output (``console.log``) and
its exit (``console-exit.json``). Stop is one SIGINT to the run's process
group: ``fedmeta train`` finishes the round, keeps the checkpoint and exits 130,
and the run can be resumed. Runs the console did not start are never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

from fedmeta.console.runs import LAUNCH_EXIT, check_name, lock_holder
from fedmeta.files import atomic_write_text

LAUNCH_CONFIG = "launch.toml"


class LaunchError(ValueError):
    """A launch, stop or resume that cannot be done; ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class Supervisor:
    """The console's child processes, by run name."""

    def __init__(self, runs: Path):
        self.runs = Path(runs)
        self.children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def launched(self, name: str) -> dict | None:
        """``{"pid", "alive"}`` for a run this console started, else None."""
        child = self.children.get(name)
        if child is None:
            return None
        return {"pid": child.pid, "alive": child.poll() is None}

    def _start(self, name: str, args: list[str]) -> dict:
        run_dir = self.runs / name
        (run_dir / LAUNCH_EXIT).unlink(missing_ok=True)
        child = subprocess.Popen(
            [sys.executable, "-m", "fedmeta.console.launcher", str(run_dir), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.children[name] = child
        return {"name": name, "pid": child.pid}

    def launch(self, name: str, config_text: str, rounds: int | None = None) -> dict:
        """Check ``config_text`` as ``fedmeta train`` would, then start it in ``RUNS/<name>``."""
        from fedmeta.fl.config import ConfigError, RunConfig

        try:
            check_name(name)
        except ValueError as e:
            raise LaunchError(str(e)) from None
        if rounds is not None and rounds < 1:
            raise LaunchError(f"rounds must be at least 1, got {rounds}")
        try:
            data = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError as e:
            raise LaunchError(f"config: invalid TOML: {e}") from None
        try:
            RunConfig.from_dict(data, [f"rounds={rounds}"] if rounds is not None else [], source="config")
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        with self._lock:
            run_dir = self.runs / name
            if run_dir.exists():
                raise LaunchError(f"a run named {name!r} already exists in {self.runs}: choose another name, or resume it", 409)
            run_dir.mkdir(parents=True)
            atomic_write_text(run_dir / LAUNCH_CONFIG, config_text)
            args = ["train", "--config", str(run_dir / LAUNCH_CONFIG), "--run-dir", str(run_dir)]
            return self._start(name, args + (["--rounds", str(rounds)] if rounds is not None else []))

    def resume(self, name: str) -> dict:
        run_dir = self._existing(name)
        with self._lock:
            if lock_holder(run_dir) is not None or (self.launched(name) or {}).get("alive"):
                raise LaunchError(f"run {name!r} is running: stop it before resuming", 409)
            if not (run_dir / "checkpoint.pt").exists():
                raise LaunchError(f"run {name!r} has no checkpoint to resume from: launch it again under a new name", 409)
            return self._start(name, ["train", "--resume", str(run_dir)])

    def stop(self, name: str) -> dict:
        """One Ctrl-C to a run this console started: it checkpoints and exits; the page then offers resume."""
        run_dir = self._existing(name)
        launched = self.launched(name)
        if launched is None:
            holder = lock_holder(run_dir)
            how = f" (pid {holder.get('pid', '?')} on {holder.get('host', '?')})" if holder else ""
            raise LaunchError(f"run {name!r} was not started by this console{how}: stop it where it runs", 409)
        if not launched["alive"]:
            raise LaunchError(f"run {name!r} is not running", 409)
        os.killpg(launched["pid"], signal.SIGINT)
        return {"name": name, "stopping": True}

    def _existing(self, name: str) -> Path:
        try:
            check_name(name)
        except ValueError as e:
            raise LaunchError(str(e), 404) from None
        run_dir = self.runs / name
        if not run_dir.is_dir():
            raise LaunchError(f"no run named {name!r} in {self.runs}", 404)
        return run_dir
