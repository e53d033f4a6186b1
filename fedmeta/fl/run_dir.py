"""The run folder: configuration, per-round atomic checkpoints, metrics as JSON lines.

Layout of ``RUN_DIR``::

    config.toml        the run's configuration (resume reads it back)
    checkpoint.pt      last completed round: global state, server-optimizer state,
                       round, RNG state (under DP the secret sampler's key),
                       config hash, the federation's normalization statistics
                       (written atomically, owner-only)
    metrics.jsonl      one row per round and site (phase train/evaluate), plus
                       one aggregated row per round (site "*")
    base_model.pt      the global base model after the last round, with the
                       normalization statistics the federation computed
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
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


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

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

    def save_base_model(
        self, state: dict[str, torch.Tensor], config: RunConfig, round_: int, privacy: dict | None = None, statistics: dict | None = None
    ) -> None:
        """The global base model; ``privacy`` records the (epsilon, delta) spent to make it, ``statistics`` the
        normalization the federation computed (``{feature: [mean, std]}``, :mod:`fedmeta.fl.normalization`)."""
        buf = io.BytesIO()
        normalization = {k: [float(m), float(sd)] for k, (m, sd) in statistics.items()} if statistics else None
        torch.save({"state": state, "config": config.model_dump(mode="json"), "round": round_, "privacy": privacy, "normalization": normalization}, buf)
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

