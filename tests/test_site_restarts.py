"""A site whose local training diverges restarts from the received model with a smaller step, and says so;
one that diverges on every restart sits the round out, which does not fail the run."""

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fedmeta.data import hospital_federation
from fedmeta.fl import site_training
from fedmeta.fl.config import RunConfig
from fedmeta.meta import FOMAML, Reptile

SETTINGS = {"model": {"hidden": [8]}, "local": {"steps": 3, "lr": 0.05}}
# The training method whose first call a test poisons, per algorithm: one diverged step ruins that local run.
STEP = {"fomaml": (FOMAML, "meta_loss_and_grad"), "reptile": (Reptile, "delta")}


@pytest.fixture(scope="module")
def site():
    return hospital_federation(n_sites=1, seed=3)[0]


def _config(algorithm: str, lr_factor: float = 1.0) -> RunConfig:
    return RunConfig.from_dict({**SETTINGS, "algorithm": {"name": algorithm, "lr": 0.05 * lr_factor}, "local": {**SETTINGS["local"], "lr": 0.05 * lr_factor}})


def _received(config: RunConfig, site) -> dict[str, torch.Tensor]:
    state = site_training.build_algorithm(config).init_state(site_training.build_model(config, site))
    return {f"{g}.{k}": v for g, values in state.items() for k, v in values.items()}


def _poison(monkeypatch, algorithm: str, calls: int | None) -> None:
    """The first ``calls`` steps (every step if None) return NaN, as a step overshooting on a noisy model would."""
    cls, method = STEP[algorithm]
    real = getattr(cls, method)
    seen = {"calls": 0}

    def step(self, *args, **kwargs):
        seen["calls"] += 1
        first, second = real(self, *args, **kwargs)
        if calls is not None and seen["calls"] > calls:
            return first, second
        nan = lambda v: {k: nan(t) for k, t in v.items()} if isinstance(v, dict) else torch.full_like(v, float("nan"))  # noqa: E731
        return nan(first), nan(second)

    monkeypatch.setattr(cls, method, step)


def _finite(update: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.values())


@pytest.mark.parametrize("algorithm", sorted(STEP))
def test_a_diverged_local_run_restarts_from_the_received_model_with_half_the_step(site, monkeypatch, algorithm):
    config = _config(algorithm)
    received = _received(config, site)
    halved, _ = site_training.local_update(_config(algorithm, lr_factor=0.5), site, received, round_seed=11)
    _poison(monkeypatch, algorithm, calls=1)
    update, metrics = site_training.local_update(config, site, received, round_seed=11)
    assert metrics["restarts"] == 1
    assert _finite(update) and metrics["loss"] == pytest.approx(metrics["loss"])  # the released loss is a number, not NaN
    # Exactly the run a site with half the learning rates makes from the model it received.
    for key in halved:
        torch.testing.assert_close(update[key], halved[key])
    assert site_training.outgoing_update(config, update, partition=0).keys() == update.keys()


def test_a_run_that_needs_no_restart_reports_none(site):
    config = _config("fomaml")
    update, metrics = site_training.local_update(config, site, _received(config, site), round_seed=11)
    assert metrics["restarts"] == 0 and _finite(update)


@pytest.mark.parametrize("algorithm", sorted(STEP))
def test_a_site_that_diverges_on_every_restart_still_sits_out_the_round(site, monkeypatch, algorithm):
    config = _config(algorithm)
    received = _received(config, site)
    _poison(monkeypatch, algorithm, calls=None)
    update, metrics = site_training.local_update(config, site, received, round_seed=11)
    assert metrics["restarts"] == site_training.MAX_RESTARTS and not _finite(update)
    with pytest.raises(site_training.SiteDiverged, match=site_training.SAT_OUT):
        site_training.outgoing_update(config, update, partition=0)


def _flower_failure(node: int, error: Exception) -> str:
    """A site's exception as the strategy records it from Flower's error reply (simulation engine)."""
    return f"node {node}: <class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: {error}'>"


def _train_with(monkeypatch, tmp_path, error: Exception):
    """``fedmeta train`` on a simulation whose round 1 ends with hospital_001 raising ``error`` and hospital_002 restarting twice."""
    from fedmeta.cli import app
    from fedmeta.fl import simulation
    from fedmeta.fl.app import site_failures
    from fedmeta.fl.run_dir import RunDir

    def run_simulation(config, run_dir, resume=False, observer=None, verbose=False, accept_review=False):
        rd = RunDir(run_dir)
        rd.create(config)
        observer.start(1, config.rounds)
        strategy = SimpleNamespace(failures=[_flower_failure(7, error)], node_sites={7: "hospital_001"})
        observer.sites_failed(1, site_failures(strategy))
        rd.append_metrics([{"round": 1, "phase": "train", "site": "hospital_002", "loss": 0.6, "restarts": 2},
                           {"round": 1, "phase": "train", "site": "*", "loss": 0.6, "skipped": False}])
        observer.round_done(1, {"loss": 0.6})
        observer.stop()
        rd.base_model_path.write_bytes(b"")
        return rd

    monkeypatch.setattr(simulation, "run_simulation", run_simulation)
    config = tmp_path / "run.toml"
    config.write_text('name = "t"\nrounds = 1\n')
    return CliRunner().invoke(app, ["train", "--config", str(config), "--run-dir", str(tmp_path / "run")])


def test_a_run_in_which_a_site_sat_out_a_round_completes_with_exit_0_and_names_it(monkeypatch, tmp_path):
    with pytest.raises(site_training.SiteDiverged) as diverged:
        site_training.outgoing_update(RunConfig(), {"params.w": torch.tensor([float("nan")])}, partition=0)
    result = _train_with(monkeypatch, tmp_path, diverged.value)
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "round 1: site hospital_001 sat out" in output
    assert "1 site(s) sat out a round" in output and "hospital_001 (round 1)" in output
    assert "hospital_002 (round 1: 2 restart(s))" in output


def test_a_run_in_which_a_site_raised_still_ends_with_exit_1(monkeypatch, tmp_path):
    result = _train_with(monkeypatch, tmp_path, RuntimeError("site.csv: cannot read"))
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "round 1: site hospital_001 failed: site.csv: cannot read" in output, output
    assert "1 site(s) failed during training" in output
