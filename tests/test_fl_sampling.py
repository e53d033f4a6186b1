"""Who is sampled each round: secret under DP (amplification needs it), reproducible without, exact across a resume."""

import io
import random
from collections import Counter

import pytest
import torch

from fedmeta.fl.aggregation import ServerSGD
from fedmeta.fl.config import RunConfig
from fedmeta.fl.sampling import SecretRandom, restore_sampler, site_sampler
from fedmeta.fl.strategy import MetaStrategy

SITES = 20


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _config(dp: bool) -> RunConfig:
    privacy = {"clip_norm": 1.0, "noise_multiplier": 1.0} if dp else {}
    return RunConfig.from_dict({"seed": 3, "federation": {"n_sites": SITES}, "server": {"fraction_train": 0.2, "min_sites": 2}, "privacy": privacy})


def _strategy(config: RunConfig, sampler: random.Random) -> MetaStrategy:
    strategy = MetaStrategy(config, ServerSGD(1.0), sampler)
    strategy.roll_call = lambda grid, unknown: strategy.node_sites.update({n: f"site_{n:03d}" for n in unknown})
    return strategy


def _samples(strategy: MetaStrategy, rounds: int) -> list[list[str]]:
    grid = _Grid(list(range(SITES)))
    out = []
    for _ in range(rounds):
        strategy._sample(grid, strategy.config.server.fraction_train)
        out.append(strategy.last_sampled_sites)
    return out


def test_two_dp_runs_of_one_configuration_sample_different_sites():
    config = _config(dp=True)
    first, second = (_samples(_strategy(config, site_sampler(config)), 10) for _ in range(2))
    assert first != second
    # Nor can a site replay the sample from the configuration it is sent (its seed included).
    seeded = _samples(_strategy(config, random.Random(config.seed)), 10)
    assert first != seeded and second != seeded


def test_without_dp_the_seed_still_reproduces_the_sample():
    config = _config(dp=False)
    assert _samples(_strategy(config, site_sampler(config)), 10) == _samples(_strategy(config, site_sampler(config)), 10)


def test_a_resumed_dp_run_samples_as_an_uninterrupted_one():
    config = _config(dp=True)
    uninterrupted = _strategy(config, site_sampler(config))
    head = _samples(uninterrupted, 4)
    # What the checkpoint keeps (torch.save of the sampler's state), read back by a new coordinator process.
    buf = io.BytesIO()
    torch.save({"rng_state": uninterrupted.rng.getstate()}, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)["rng_state"]
    resumed = _strategy(config, restore_sampler(config, state))
    assert _samples(resumed, 6) == _samples(uninterrupted, 6)
    assert len(head) == 4


def test_a_dp_run_refuses_to_resume_with_a_seeded_sampler_state():
    with pytest.raises(ValueError, match="secret"):
        restore_sampler(_config(dp=True), random.Random(0).getstate())


def test_the_secret_sample_is_uniform_over_sites():
    # The account assumes m of n uniformly without replacement: every site's inclusion rate is m / n.
    draw, rounds = SecretRandom(), 4000
    counts = Counter(site for _ in range(rounds) for site in draw.sample(range(SITES), 4))
    expected, sd = rounds * 4 / SITES, (rounds * 0.2 * 0.8) ** 0.5
    assert set(counts) == set(range(SITES))
    assert all(abs(c - expected) < 5 * sd for c in counts.values()), counts
    # And a draw's members are distinct (without replacement).
    assert all(len(set(draw.sample(range(SITES), 4))) == 4 for _ in range(100))


def test_the_checkpoint_that_holds_the_secret_key_is_readable_by_its_owner_only(tmp_path):
    from fedmeta.fl.run_dir import Checkpoint, RunDir

    run = RunDir(tmp_path / "run")
    run.save_checkpoint(Checkpoint(1, {}, {}, SecretRandom().getstate(), torch.get_rng_state(), "digest", {}))
    assert run.checkpoint_path.stat().st_mode & 0o777 == 0o600
    assert isinstance(run.load_checkpoint().rng_state[1], bytes)
