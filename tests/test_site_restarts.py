"""A site whose local training diverges restarts from the received model with a smaller step, and says so."""

import pytest
import torch

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
