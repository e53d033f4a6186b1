"""Episode sampling, synthetic federations and site files behave as specified."""

import numpy as np
import pandas as pd
import pytest

from fedmeta.data import (
    EpisodeSampler,
    SchemaError,
    SineTasks,
    fedprox_synthetic,
    hospital_federation,
    load_site,
    write_hospital_federation,
)


def test_classification_support_holds_k_shots_of_every_class():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [50, 30, 20])
    batch = EpisodeSampler(rng.normal(size=(100, 4)), y, "t", classification=True, shots=5, query_size=10).sample(6)
    for i in range(6):
        counts = np.bincount(batch.support_y[i].numpy(), minlength=3)
        assert counts.tolist() == [5, 5, 5]
    assert (batch.support_w > 0).sum().item() == 6 * 15


def test_support_and_query_of_an_episode_do_not_overlap():
    x = np.arange(60, dtype=np.float32)[:, None]
    y = np.arange(60) % 2
    batch = EpisodeSampler(x, y, "t", classification=True, shots=4, query_size=20).sample(3)
    for i in range(3):
        assert not set(batch.support_x[i, :, 0].tolist()) & set(batch.query_x[i, :, 0].tolist())


def test_a_rare_class_is_padded_with_zero_weight_rows():
    x = np.arange(30, dtype=np.float32)[:, None]
    y = np.array([0] * 27 + [1] * 3)
    batch = EpisodeSampler(x, y, "t", classification=True, shots=5, query_size=8, prior_weighted=False).sample(2)
    assert batch.support_x.shape == (2, 10, 1)
    assert batch.support_w[0].tolist() == [1.0] * 5 + [1.0] * 2 + [0.0] * 3


def test_support_rows_are_weighted_by_the_site_class_mix():
    y = np.array([0] * 80 + [1] * 20)
    batch = EpisodeSampler(np.zeros((100, 1)), y, "t", classification=True, shots=4, query_size=8).sample(1)
    weights = dict(zip(batch.support_y[0].tolist(), batch.support_w[0].tolist()))
    assert weights == {0: pytest.approx(1.6), 1: pytest.approx(0.4)}


def test_regression_support_has_k_rows_and_k_too_large_is_a_clear_error():
    x = np.zeros((12, 2))
    y = np.arange(12.0)
    assert EpisodeSampler(x, y, "los", classification=False, shots=10, query_size=2).sample(1).support_x.shape == (1, 10, 2)
    with pytest.raises(ValueError, match="K=20 shots need at least 20 labelled rows, the site has 12"):
        EpisodeSampler(x, y, "los", classification=False, shots=20)


def test_sine_tasks_follow_the_maml_recipe():
    batch = SineTasks(seed=0).sample(meta_batch=200, shots=10)
    assert batch.support_x.min() >= -5 and batch.support_x.max() <= 5
    assert batch.support_y.abs().max() <= 5


def test_generators_are_deterministic_for_a_seed():
    a = fedprox_synthetic(1, 1, n_sites=5, seed=3)
    b = fedprox_synthetic(1, 1, n_sites=5, seed=3)
    assert all(np.array_equal(s.x, t.x) for s, t in zip(a, b))
    c = fedprox_synthetic(1, 1, n_sites=5, seed=4)
    assert not np.array_equal(a[0].x[:10], c[0].x[:10])


def test_fedprox_synthetic_has_60_features_10_classes_and_uneven_sites():
    sites = fedprox_synthetic(0.5, 0.5, n_sites=30, seed=0)
    assert all(s.x.shape[1] == 60 for s in sites)
    labels = np.concatenate([s.labels["label"] for s in sites])
    assert set(np.unique(labels)) <= set(range(10)) and len(np.unique(labels)) > 5
    sizes = [s.n_rows for s in sites]
    assert min(sizes) >= 50 and max(sizes) > 4 * min(sizes)


def test_hospital_sites_differ_in_size_case_mix_and_tasks():
    sites = hospital_federation(n_sites=20, seed=0)
    sizes = [s.n_rows for s in sites]
    assert max(sizes) > 3 * min(sizes)
    task_sets = {tuple(s.tasks) for s in sites}
    assert len(task_sets) > 1, "not every site should have every task"
    rates = [s.split("mortality")[1].mean() for s in sites if "mortality" in s.tasks]
    assert max(rates) - min(rates) > 0.05


def test_held_out_rows_are_never_in_training_episodes():
    site = hospital_federation(n_sites=1, seed=1)[0]
    task = site.tasks[0]
    train_x, _ = site.split(task, train=True)
    test_x, _ = site.split(task, train=False)
    train_rows = {r.tobytes() for r in train_x}
    assert not any(r.tobytes() in train_rows for r in test_x)


def test_written_hospital_federation_loads_back(tmp_path):
    schema_path, paths = write_hospital_federation(tmp_path, n_sites=3, seed=0)
    site = load_site(paths[0], schema_path)
    assert site.x.shape[1] == 18 and site.n_rows > 0
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda df: df.drop(columns=["age"]), r"missing feature column\(s\) \['age'\]"),
        (lambda df: df.assign(age=df["age"].astype(object).where(df.index != 3, "old")), r"column 'age' row 5: expected a number, got 'old'"),
        (lambda df: df.assign(sodium=df["sodium"].where(df.index != 0, np.nan)), r"column 'sodium' row 2: missing value \(NaN\)"),
        (lambda df: df.assign(ward=df["ward"].where(df.index != 1, "oncology")), r"column 'ward' row 3: unknown category 'oncology'"),
    ],
)
def test_bad_site_files_get_errors_naming_file_column_and_row(tmp_path, mutate, message):
    schema_path, paths = write_hospital_federation(tmp_path, n_sites=1, seed=0)
    bad = tmp_path / "bad.csv"
    mutate(pd.read_csv(paths[0])).to_csv(bad, index=False)
    with pytest.raises(SchemaError, match=str(bad).replace(".", r"\.") + ".*" + message):
        load_site(bad, schema_path)
