"""Shared fixtures: a small hospital federation on disk and base models in run-folder format."""

import logging
from functools import lru_cache
from pathlib import Path

import pytest

from fedmeta.data import hospital_federation, write_hospital_federation
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(config, items):
    """Tests sharing a module-scoped fixture run on one worker, so that the fixture (a deployment, a trained site
    home) is built once, not once per worker that happens to get one of them (``--dist loadgroup``)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        definitions = getattr(item, "_fixtureinfo", None)
        shared = definitions is not None and any(
            d.scope == "module" for defs in definitions.name2fixturedefs.values() for d in defs
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(autouse=True)
def _server_loggers_restored():
    """A test that runs `fedmeta serve` in-process configures the server's loggers (no propagation to the root
    logger): restore them, or later tests in the same worker lose their log records to caplog."""
    loggers = [logging.getLogger(name) for name in ("fedmeta.serving", "fedmeta.serving.access", "uvicorn")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:], lg.propagate = handlers, propagate
        lg.setLevel(level)


@lru_cache(maxsize=1)
def hospital_statistics() -> dict[str, tuple[float, float]]:
    """The normalization a training run on the ``hospitals`` federation computes (its sites' training rows)."""
    return hospital_federation(n_sites=3, seed=0)[0].schema.statistics()


def write_base(run: Path, algorithm: str = "fomaml", hidden=(16, 16), seed: int = 0) -> Path:
    """A run folder holding a base model in the format training writes (round-0 weights, the ``hospitals`` federation's normalization)."""
    config = RunConfig.from_dict({"name": run.name, "seed": seed, "model": {"hidden": list(hidden)}, "algorithm": {"name": algorithm}})
    run_dir = RunDir(run)
    run_dir.create(config)
    run_dir.save_base_model(initial_state(config), config, round_=1, statistics=hospital_statistics())
    return run


@pytest.fixture(scope="session")
def hospitals(tmp_path_factory) -> Path:
    """Three hospital sites as CSV files plus schema.json."""
    out = tmp_path_factory.mktemp("hospitals")
    write_hospital_federation(out, n_sites=3, seed=0)
    return out


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("runs") / "base")


@pytest.fixture(scope="session")
def readme_session(tmp_path_factory):
    """The README's blocks, pasted in order into one folder (:mod:`readme_session`), shared by the tests that check them."""
    from readme_session import PastingSession

    session = PastingSession(tmp_path_factory.mktemp("readme"))
    yield session
    session.stop_server()  # a serving block whose requests block did not run (a -k selection) still stops
