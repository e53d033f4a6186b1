"""The embedded default: a Flower simulation on this machine, no server to start.

``flwr.simulation.run_simulation`` runs the ServerApp in this process and the
sites' ClientApps on a local Ray cluster. Nothing is installed per run.

Ctrl-C stops a run at the next safe point: the round loop checks a stop flag
between rounds and while it waits for replies, so the last completed round's
checkpoint is what remains (:class:`TrainingStopped` says how to resume). A
second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from fedmeta.files import atomic_write_json
from fedmeta.fl import exchange as wire
from fedmeta.fl.app import RoundObserver, make_server_app
from fedmeta.fl.site_app import client_app
from fedmeta.fl.regions import load_regions
from fedmeta.fl.config import RunConfig
from fedmeta.fl.data_defaults import choose as choose_defaults
from fedmeta.fl.run_dir import RunDir
from fedmeta.fl import simulation_polling
from fedmeta.fl.sites import prepare_federation


class _DeprecationNotice(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated: it is addressed to Flower users, not ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


class _SiteTracebacks(logging.Filter):
    """Drops Flower's and Ray's multi-page tracebacks of a failed site: the round loop reports each failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_backend = record.levelno >= logging.ERROR and any(part in record.pathname for part in ("/fleet/vce/", "/ray_transport/"))
        strategy_line = record.name == "flwr.fedmeta" and "failed:" in record.getMessage() and "\n" in record.getMessage()
        return not (from_backend or strategy_line)


class TrainingStopped(RuntimeError):
    """The run was stopped on request (Ctrl-C); its last completed round is checkpointed."""


@contextlib.contextmanager
def stop_on_interrupt():
    """While inside, the first Ctrl-C asks the round loop to stop at its next safe point; a second aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if wire.STOP.is_set():
            raise KeyboardInterrupt
        wire.STOP.set()
        print("stopping after the current step (the last completed round is checkpointed); Ctrl-C again aborts now", file=sys.stderr, flush=True)

    wire.STOP.clear()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def is_complete(rd: RunDir, config: RunConfig) -> bool:
    """The run wrote its base model after its last round, and its regional bases, and has nothing left to do."""
    ckpt = rd.load_checkpoint()
    if ckpt is None or not rd.base_model_path.exists() or ckpt.round < config.rounds:
        return False
    regions = load_regions(rd.path) or {}
    if config.regions.rounds and (regions.get("global_round") != ckpt.round or not regions.get("complete", False)):
        return False  # the regional stage (fedmeta.fl.regional_rounds) has not finished
    return int(torch.load(rd.base_model_path, weights_only=False)["round"]) == ckpt.round


DEFAULTS_FILE = "defaults.json"  # the settings chosen from the data, and why (fedmeta.fl.data_defaults)


def run_simulation(
    config: RunConfig, run_dir: str | Path, resume: bool = False, observer: RoundObserver | None = None, verbose: bool = False, accept_review: bool = False
) -> RunDir:
    """Train ``config`` in simulation, writing to ``run_dir``; with ``resume`` continue its last checkpoint.

    A CSV federation is checked first (:func:`~fedmeta.fl.sites.prepare_federation`):
    ``federation.n_sites`` becomes the number of sites found, the settings
    the config leaves unset are chosen from the rows
    (:mod:`fedmeta.fl.data_defaults`), and the run folder records both. A site
    whose ``mapping.json`` has columns under review is refused unless ``accept_review``.

    Resuming a complete run does nothing (check :func:`is_complete` first to say so).
    The folder is held for the whole run (:meth:`RunDir.hold`): a second
    ``fedmeta train`` or ``flwr run`` on it refuses in one line.
    """
    rd = RunDir(run_dir)
    with rd.hold(engine="simulation"):  # one server per run folder
        return _run_simulation(config, rd, resume, observer, verbose, accept_review)


def _run_simulation(config: RunConfig, rd: RunDir, resume: bool, observer: RoundObserver | None, verbose: bool, accept_review: bool = False) -> RunDir:
    from flwr.simulation import run_simulation as flwr_run_simulation

    if resume:
        config = rd.load_config()
        if is_complete(rd, config):
            return rd
    # Every site's files are read and checked here, before a worker starts: a bad one is one line, not a Ray traceback.
    given = config
    config, sites = prepare_federation(config, accept_review)
    if not resume:
        config, chosen = choose_defaults(config, sites, given)
        rd.create(config)
        if chosen:
            atomic_write_json(rd.path / DEFAULTS_FILE, [c.as_dict() for c in chosen])
            if observer is not None and hasattr(observer, "chose_defaults"):
                observer.chose_defaults(chosen)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray runs its workers at nice 15 by default; here they are the run's sites, its main work. At nice 15 any
    # other job on the machine starves them (measured: the quick demo stalled for minutes behind two CPU-bound
    # jobs), so they run at the driver's priority unless RAY_worker_niceness says otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        if not any(isinstance(f, _DeprecationNotice) for f in flwr_log.filters):
            flwr_log.addFilter(_DeprecationNotice())
        for logger in (flwr_log, logging.getLogger("flwr.fedmeta")):
            if not any(isinstance(f, _SiteTracebacks) for f in logger.filters):
                logger.addFilter(_SiteTracebacks())
    backend_config = {
        "client_resources": {"num_cpus": config.simulation.cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": 0, "include_dashboard": False, "log_to_driver": verbose},
    }
    simulation_polling.install()  # Flower's own loop costs (sites x messages) per sweep: 1.3 s a round at 10,000 sites
    with stop_on_interrupt():
        try:
            flwr_run_simulation(
                server_app=make_server_app(config, rd.path, observer),
                client_app=client_app,
                num_supernodes=config.federation.n_sites,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        except Exception:
            if not wire.STOP.is_set():
                raise
    if wire.STOP.is_set():
        ckpt = rd.load_checkpoint()
        done = f"after round {ckpt.round} of {config.rounds}" if ckpt else "before its first round"
        raise TrainingStopped(f"stopped {done}; the checkpoint is kept. Resume with: fedmeta train --resume {rd.path}")
    if not rd.base_model_path.exists():
        raise RuntimeError(f"the simulation stopped before finishing; see the log above. Resume with: fedmeta train --resume {rd.path}")
    return rd
