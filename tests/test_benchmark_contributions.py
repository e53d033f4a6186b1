"""benchmarks/contributions.py's own pieces (issue 29, item 5): the federation it writes, and the coalition retraining
that gives exact Shapley values; none needs a Flower run or the contributions feature."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmeta.data import SiteData
from fedmeta.data.schema import Schema, TaskColumn, numeric_schema
from fedmeta.data.site import held_out_mask
from fedmeta.fl.aggregation import flatten_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.site_training import build_algorithm, build_model, local_update


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parents[1] / "benchmarks" / "contributions.py"
    spec = importlib.util.spec_from_file_location("contributions_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toy_site(name: str, rows: int, seed: int) -> SiteData:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, 3)).astype(np.float32)
    schema = numeric_schema(3, [TaskColumn(name="outcome", kind="binary", label="y", classes=["0", "1"])]).with_statistics({f"x{j}": (0.0, 1.0) for j in range(3)})
    return SiteData.from_arrays(name, schema, x, {"outcome": (x[:, 0] > 0).astype(np.int64)})


@pytest.fixture(scope="module")
def toy():
    """Two sites of different sizes, a tiny model, two rounds of Reptile with server momentum."""
    config = RunConfig.from_dict({
        "rounds": 2, "seed": 3, "model": {"hidden": [4]}, "algorithm": {"name": "reptile"},
        "local": {"steps": 2, "meta_batch": 2, "shots": 2, "query_size": 4}, "server": {"lr": 0.8, "momentum": 0.5, "min_sites": 1},
    })
    a, b = _toy_site("a", 40, 0), _toy_site("b", 100, 1)
    torch.manual_seed(0)
    initial = flatten_state(build_algorithm(config).init_state(build_model(config, a)))
    return config, [a, b], initial


def _weighted(updates, weights):
    return {k: sum(w * u[k] for u, w in zip(updates, weights)) / sum(weights) for k in updates[0]}


def test_a_coalition_is_trained_as_the_server_trains_it(bench, toy):
    config, (a, b), initial = toy
    n_a, n_b = a.n_labelled("outcome"), b.n_labelled("outcome")
    # By hand: each site trains from the global model with the run's seed rule (partition = index), the server
    # takes the example-weighted mean and steps with heavy-ball momentum 0.5 at lr 0.8.
    seed = lambda round_, partition: 3 * 1_000_003 + round_ * 1009 + partition
    m1 = _weighted([local_update(config, a, initial, seed(1, 0))[0], local_update(config, b, initial, seed(1, 1))[0]], [n_a, n_b])
    after_1 = {k: initial[k] - 0.8 * m1[k] for k in initial}
    m2 = _weighted([local_update(config, a, after_1, seed(2, 0))[0], local_update(config, b, after_1, seed(2, 1))[0]], [n_a, n_b])
    expected = {k: after_1[k] - 0.8 * (0.5 * m1[k] + m2[k]) for k in initial}

    trained = bench.train_coalition(config, initial, [a, b], frozenset({"a", "b"}), frozenset())

    for k in initial:
        torch.testing.assert_close(trained[k], expected[k], rtol=0, atol=1e-6)


def test_a_free_rider_sends_zeros_but_dilutes_the_step_by_the_examples_it_claims(bench, toy):
    config, (a, b), initial = toy
    config = config.model_copy(update={"rounds": 1})
    n_a, n_b = a.n_labelled("outcome"), b.n_labelled("outcome")
    u_a = local_update(config, a, initial, 3 * 1_000_003 + 1009)[0]

    trained = bench.train_coalition(config, initial, [a, b], frozenset({"a", "b"}), free_riders=frozenset({"b"}))

    for k in initial:
        torch.testing.assert_close(trained[k], initial[k] - 0.8 * u_a[k] * n_a / (n_a + n_b), rtol=0, atol=1e-6)


def test_the_empty_coalition_and_a_lone_free_rider_keep_the_initial_model(bench, toy):
    config, sites, initial = toy
    for coalition in (frozenset(), frozenset({"b"})):
        trained = bench.train_coalition(config, initial, sites, coalition, free_riders=frozenset({"b"}))
        assert all(torch.equal(trained[k], initial[k]) for k in initial)


def test_shuffled_training_labels_are_a_permutation_and_held_out_labels_are_kept(bench):
    frame = pd.DataFrame({"x0": np.arange(200.0), "y": np.arange(200) % 2})
    shuffled = bench.shuffle_training_labels(frame, "site_3", seed=5, rng=np.random.default_rng(0))
    held = held_out_mask("site_3", 200, bench.TEST_FRACTION, 5)

    assert sorted(shuffled["y"][~held]) == sorted(frame["y"][~held])
    assert (shuffled["y"][held] == frame["y"][held]).all()
    assert (shuffled["y"][~held] != frame["y"][~held]).mean() > 0.3
    assert (shuffled["x0"] == frame["x0"]).all()


def test_the_federation_has_one_shuffled_site_one_free_rider_and_a_factor_8_in_size(bench):
    _, frames, roles = bench.federation_frames(6, seed=0)
    sizes = sorted(len(f) for f in frames.values())

    assert sizes[-1] == 8 * sizes[0]
    assert sorted(roles.values()).count(bench.SHUFFLED) == 1 and sorted(roles.values()).count(bench.FREE_RIDER) == 1
    # Neither bad site is the smallest: being last must come from its quality, not its size.
    assert all(len(frames[s]) > sizes[0] for s, role in roles.items() if role != bench.HONEST)


def test_the_written_schema_states_every_statistic_so_runs_and_retraining_encode_alike(bench, tmp_path):
    bench.write_contribution_federation(tmp_path, 6, seed=0)

    schema = Schema.load(tmp_path / "schema.json")
    assert schema.unnormalized == []
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == [f"site_{i}.csv" for i in range(6)]

