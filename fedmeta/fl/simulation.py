"""The embedded default: a Flower simulation on this machine, no server to start.

``flwr.simulation.run_simulation`` runs the ServerApp in this process and the
sites' ClientApps on a local Ray cluster. Nothing is installed per run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedmeta.fl.app import RoundObserver, client_app, make_server_app
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir


class _DeprecationNotice(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated: it is addressed to Flower users, not ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def run_simulation(config: RunConfig, run_dir: str | Path, resume: bool = False, observer: RoundObserver | None = None, verbose: bool = False) -> RunDir:
    """Train ``config`` in simulation, writing to ``run_dir``; with ``resume`` continue its last checkpoint."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    rd = RunDir(run_dir)
    if resume:
        config = rd.load_config()
    else:
        rd.create(config)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        if not any(isinstance(f, _DeprecationNotice) for f in flwr_log.filters):
            flwr_log.addFilter(_DeprecationNotice())
    backend_config = {
        "client_resources": {"num_cpus": config.simulation.cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": 0, "include_dashboard": False, "log_to_driver": verbose},
    }
    flwr_run_simulation(
        server_app=make_server_app(config, rd.path, observer),
        client_app=client_app,
        num_supernodes=config.federation.n_sites,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if not rd.base_model_path.exists():
        raise RuntimeError(f"the simulation stopped before finishing; see the log above. Resume with: fedmeta train --resume {rd.path}")
    return rd
