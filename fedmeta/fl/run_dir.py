"""The run folder: configuration, per-round atomic checkpoints, metrics as JSON lines.

Layout of ``RUN_DIR``::

    config.toml        the run's configuration (resume reads it back)
    checkpoint.pt      last completed round: global state, server-optimizer state,
                       round, RNG state (under DP the secret sampler's key),
                       config hash, the federation's normalization statistics
                       (written atomically, owner-only)
    metrics.jsonl      one row per round and site (phase train/evaluate), plus
                       one aggregated row per round (site "*")
    sites.json         the run's sites by name (:mod:`fedmeta.fl.roster`)
    base_model.pt      the global base model after the last round, with the
                       normalization statistics the federation computed
    .lock              held (an OS file lock) by the one server training in
                       the folder; it names its holder (run id, pid, host)

The lock is ``fcntl.flock``: the kernel releases it when its holder exits,
however it exits, so a crashed server never leaves a folder locked. It
assumes a local file system (flock is not shared across NFS clients): keep
run folders on the coordinator's own disk.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from fedmeta.files import atomic_write_bytes, atomic_write_text
from fedmeta.fl.config import ConfigError, RunConfig


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    optimizer: dict
    rng_state: object
    torch_rng: torch.Tensor
    config_digest: str
    node_tasks: dict
    privacy: dict | None = None  # the privacy accountant's state, when DP noise is on
    statistics: dict | None = None  # the federation's normalization, {feature: (mean, std)} (fedmeta.fl.normalization)


class RunDirHeld(ConfigError):
    """Another server is training in this run folder."""


def _holder_text(holder: dict) -> str:
    who = f"Flower run {holder['run_id']}" if holder.get("run_id") else "a training process"
    since = f", since {holder['since']}" if holder.get("since") else ""
    how = (
        f"stop it with `flwr stop {holder['run_id']} <connection>`"
        if holder.get("engine") == "deployment" and holder.get("run_id")
        else "stop it (Ctrl-C in its terminal, or kill its pid)"
    )
    return f"{who} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}{since}); {how}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @contextmanager
    def hold(self, run_id: int | None = None, engine: str = "simulation") -> Iterator[None]:
        """Hold the folder for one server while the block runs; raise :class:`RunDirHeld` naming the holder if another has it.

        Two servers in one folder would both write the checkpoint and the
        metrics, and train (and spend privacy) twice per round.
        """
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except json.JSONDecodeError:
                    holder = {}
                raise RunDirHeld(f"{self.path} is in use by {_holder_text(holder)}; then launch again to resume it") from None
            since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            me = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "since": since, "engine": engine}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # released: the next holder writes its own name
                if created and [p.name for p in self.path.iterdir()] == [self.lock_path.name]:
                    self.lock_path.unlink()  # a run refused before it wrote anything leaves no folder behind
                    self.path.rmdir()
        finally:
            os.close(fd)  # closing releases the lock

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def base_model_path(self) -> Path:
        return self.path / "base_model.pt"

    def create(self, config: RunConfig) -> None:
        if self.checkpoint_path.exists():
            raise ConfigError(f"{self.path} already holds a run; resume it with --resume {self.path} or choose another --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config.to_toml())

    def load_config(self) -> RunConfig:
        if not self.config_path.exists():
            raise ConfigError(f"{self.path} is not a run folder: {self.config_path.name} is missing")
        return RunConfig.load(self.config_path)

    # --- checkpoints ----------------------------------------------------------
    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        buf = io.BytesIO()
        torch.save(ckpt.__dict__, buf)
        # Under DP it holds the key of the secret site sampler (fedmeta.fl.sampling): owner-only.
        atomic_write_bytes(self.checkpoint_path, buf.getvalue(), private=True)

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.exists():
            return None
        try:
            data = torch.load(self.checkpoint_path, weights_only=False)
        except Exception as e:
            raise ConfigError(f"cannot read checkpoint {self.checkpoint_path}: {e}") from None
        return Checkpoint(**data)

    def round_model_path(self, round_: int) -> Path:
        return self.path / "models" / f"round-{round_:05d}.pt"

    def save_round_model(self, round_: int, state: dict[str, torch.Tensor], elapsed: float) -> None:
        """The global state after ``round_`` kept beside the checkpoint (``server.keep_every``), with the run's seconds so far."""
        buf = io.BytesIO()
        torch.save({"state": state, "round": round_, "elapsed": elapsed}, buf)
        self.round_model_path(round_).parent.mkdir(exist_ok=True)
        atomic_write_bytes(self.round_model_path(round_), buf.getvalue())

    def save_base_model(
        self, state: dict[str, torch.Tensor], config: RunConfig, round_: int, privacy: dict | None = None, statistics: dict | None = None,
        lineage: dict | None = None,
    ) -> None:
        """The global base model; ``privacy`` records the (epsilon, delta) spent to make it, ``statistics`` the
        normalization the federation computed (``{feature: [mean, std]}``, :mod:`fedmeta.fl.normalization`),
        ``lineage`` what a regional base was trained from (:mod:`fedmeta.fl.regional_rounds`)."""
        buf = io.BytesIO()
        normalization = {k: [float(m), float(sd)] for k, (m, sd) in statistics.items()} if statistics else None
        saved = {"state": state, "config": config.model_dump(mode="json"), "round": round_, "privacy": privacy, "normalization": normalization}
        if lineage is not None:
            saved["lineage"] = lineage
        torch.save(saved, buf)
        atomic_write_bytes(self.base_model_path, buf.getvalue())

    # --- metrics --------------------------------------------------------------
    def append_metrics(self, rows: list[dict]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it is not trustworthy
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows written after the last checkpoint (their round will run again)."""
        rows = [r for r in self.read_metrics() if r.get("logged_in_round", r["round"]) <= last_round]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

