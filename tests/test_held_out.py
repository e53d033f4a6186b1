"""One split rule: the rows a site holds out are the same wherever it is loaded, and never trained on."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedmeta.data import Schema, SiteData, hospital_federation, load_federation, load_site, write_hospital_federation
from fedmeta.data.site import held_out_mask
from fedmeta.fl import site_training
from fedmeta.fl.site_app import _synthetic_federation, site_for
from fedmeta.fl.config import RunConfig


class _Context:
    def __init__(self, node_config):
        self.node_config = node_config


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    schema, paths = write_hospital_federation(out, n_sites=4, seed=7)
    return out, schema, sorted(paths)


def test_every_way_of_loading_a_site_holds_out_the_same_rows(federation):
    folder, schema, paths = federation
    seed = 7
    csv = RunConfig.from_dict({"federation": {"kind": "csv", "data_dir": str(folder), "n_sites": 4, "seed": seed}})
    synthetic = RunConfig.from_dict({"federation": {"kind": "hospitals", "n_sites": 4, "seed": seed}})
    in_memory = {s.name: s for s in _synthetic_federation(synthetic.federation.model_dump_json())}
    for partition, path in enumerate(paths):
        simulated = site_for(_Context({"partition-id": partition}), csv)
        deployed = site_for(_Context({"data-path": str(path), "schema-path": str(schema), "site-name": path.stem}), csv)
        # What `fedmeta personalize --data <file>` loads with a base trained on this federation.
        personalized = load_site(path, schema, test_fraction=csv.federation.test_fraction, seed=csv.federation.seed)
        generated = in_memory[path.stem]
        for other in (deployed, personalized, generated):
            assert other.name == simulated.name
            assert np.array_equal(other.test_mask, simulated.test_mask), (path.stem, other.name)
        assert 0 < simulated.test_mask.sum() < simulated.n_rows


def test_the_split_depends_on_the_site_and_the_federation_seed_only():
    a = held_out_mask("st-marys", 200, 0.25, seed=0)
    assert np.array_equal(a, held_out_mask("st-marys", 200, 0.25, seed=0))
    assert not np.array_equal(a, held_out_mask("st-johns", 200, 0.25, seed=0))
    assert not np.array_equal(a, held_out_mask("st-marys", 200, 0.25, seed=1))
    with pytest.raises(ValueError, match="test_fraction must be in"):
        held_out_mask("st-marys", 200, 0.0, seed=0)


def _update_with_poisoned_rows(algorithm: str, poison_held_out: bool) -> dict[str, torch.Tensor]:
    """A site's local update after the features of its held-out rows (or, as the control, its training rows) are set to NaN."""
    site = hospital_federation(n_sites=1, seed=3)[0]
    rows = site.test_mask if poison_held_out else ~site.test_mask
    site.x = site.x.copy()
    site.x[rows] = np.nan
    config = RunConfig.from_dict({"algorithm": {"name": algorithm}, "model": {"hidden": [8]}, "local": {"steps": 3}})
    state = site_training.build_algorithm(config).init_state(site_training.build_model(config, site))
    flat = {f"{g}.{k}": v for g, values in state.items() for k, v in values.items()}
    update, _ = site_training.local_update(config, site, flat, round_seed=1)
    return update


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile", "fedavg"])
def test_local_training_never_touches_a_held_out_row(algorithm):
    # Any held-out row that reached training would turn the update into NaN.
    assert all(torch.isfinite(t).all() for t in _update_with_poisoned_rows(algorithm, poison_held_out=True).values())
    # The control: poisoned training rows do reach it.
    assert not all(torch.isfinite(t).all() for t in _update_with_poisoned_rows(algorithm, poison_held_out=False).values())


@pytest.mark.slow
def test_fedmeta_personalize_scores_exactly_the_rows_training_held_out(federation, tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app
    from fedmeta.fl.app import initial_state
    from fedmeta.fl.run_dir import RunDir
    from fedmeta.manifest import read_manifest
    from fedmeta.registry import SiteHome

    folder, schema, paths = federation
    config = RunConfig.from_dict({"model": {"hidden": [8]}, "federation": {"kind": "csv", "data_dir": str(folder), "n_sites": 4, "seed": 7, "test_fraction": 0.3}})
    run = RunDir(tmp_path / "run")
    run.create(config)
    # The normalization a run on this folder computes at its roll call (the generated schema leaves it unset).
    statistics = load_federation(folder, 0.3, 7)[0].schema.statistics()
    run.save_base_model(initial_state(config), config, round_=1, statistics=statistics)
    (tmp_path / "home").mkdir()
    path = paths[2]
    result = CliRunner().invoke(app, ["personalize", "--data", str(path), "--schema", str(schema), "--base", str(run.path), "--site-home", str(tmp_path / "home"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    home = SiteHome(tmp_path / "home")
    lineage = read_manifest(home.folder(home.current(path.stem))).data
    trained = site_for(_Context({"partition-id": 2}), config)
    assert lineage["held_out_rows_sha256"] == trained.held_out_digest() and lineage["test_fraction"] == 0.3


# --- Held-out rows never reach normalization, the choice of tasks, or a head's training -------------------------


def _numpy_statistics(frames: dict[str, pd.DataFrame], columns: list[str], test_fraction: float, seed: int, held_out: bool = True):
    """Mean and population std of ``columns`` over the frames' rows, without the rows held_out_mask holds out (or, as a control, with them)."""
    kept = [f[~held_out_mask(name, len(f), test_fraction, seed)] if held_out else f for name, f in frames.items()]
    rows = pd.concat(kept)
    return {c: (rows[c].mean(), rows[c].std(ddof=0)) for c in columns}


def _assert_statistics(stated: dict, expected: dict) -> None:
    for name, (mean, std) in expected.items():
        assert stated[name] == pytest.approx((mean, std), rel=1e-6), name


def test_the_generators_state_no_statistics_computed_from_rows(tmp_path):
    from fedmeta.data.synthetic import fedprox_schema, fraud_federation_frames, hospital_federation_frames
    from fedmeta.evaluate import digits_federation_on_disk

    assert hospital_federation_frames(4, seed=1)[0].statistics() == {}
    assert fraud_federation_frames(3, seed=1)[0].statistics() == {}
    schema_path, _ = write_hospital_federation(tmp_path / "written", n_sites=2, seed=1)
    assert all(f["mean"] is None and f["std"] is None for f in json.loads(schema_path.read_text())["features"])
    digits = digits_federation_on_disk(tmp_path / "digits", alpha=5.0, n_sites=5)
    assert json.loads((digits.train_dir / "schema.json").read_text())["features"][10]["mean"] is None
    # FedProx Synthetic's identity is the paper's choice (features used as drawn), not a statistic of any row.
    assert set(fedprox_schema().statistics().values()) == {(0.0, 1.0)}


def test_a_generated_federation_is_normalized_from_its_training_sites_training_rows(tmp_path):
    from fedmeta.data import hospital_federation_frames
    from fedmeta.evaluate import hospital_federation_on_disk

    fed = hospital_federation_on_disk(tmp_path, n_sites=5, seed=4, test_fraction=0.3)  # the fifth site is unseen
    _, frames = hospital_federation_frames(5, seed=4)
    training_sites = {s.name: frames[s.name] for s in fed.seen}
    numeric = ["age", "creatinine", "wbc"]
    expected = _numpy_statistics(training_sites, numeric, 0.3, 4)
    for site in fed.seen + fed.unseen:
        _assert_statistics(site.schema.statistics(), expected)
    # The control: held-out rows and the unseen site would move them.
    for everything in (_numpy_statistics(training_sites, numeric, 0.3, 4, held_out=False), _numpy_statistics(frames, numeric, 0.3, 4)):
        assert everything["age"][0] != pytest.approx(expected["age"][0], rel=1e-6)


def test_the_in_memory_hospital_federation_is_normalized_from_training_rows_only():
    from fedmeta.data import hospital_federation_frames

    sites = hospital_federation(n_sites=3, seed=5, test_fraction=0.3)
    _, frames = hospital_federation_frames(3, seed=5)
    expected = _numpy_statistics(frames, ["age", "sodium"], 0.3, 5)
    _assert_statistics(sites[0].schema.statistics(), expected)
    assert _numpy_statistics(frames, ["age"], 0.3, 5, held_out=False)["age"][0] != pytest.approx(expected["age"][0], rel=1e-6)


def test_schema_infer_statistics_are_those_of_the_training_rows_only(tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    _, paths = write_hospital_federation(tmp_path / "fed", n_sites=3, seed=2)
    (tmp_path / "fed" / "schema.json").unlink()
    out = tmp_path / "inferred.json"
    result = CliRunner().invoke(app, ["schema", "infer", str(tmp_path / "fed"), "--task", "mortality:binary:died_in_hospital",
                                      "--ignore", "readmitted_30d", "--ignore", "length_of_stay_days", "--statistics", "--test-fraction", "0.3", "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frames = {p.stem: pd.read_csv(p) for p in paths}
    expected = _numpy_statistics(frames, ["age", "heart_rate", "creatinine"], 0.3, 2)
    _assert_statistics(Schema.load(out).statistics(), expected)
    # The control: over every row of the files the statistics differ.
    assert _numpy_statistics(frames, ["age"], 0.3, 2, held_out=False)["age"][0] != pytest.approx(expected["age"][0], rel=1e-6)


def test_a_site_with_its_own_test_file_gives_schema_infer_every_row_of_its_training_file(tmp_path):
    from fedmeta.data.infer import TaskRequest, infer_schema, read_tables
    from fedmeta.data.synthetic import write_clinic_federation

    folders = write_clinic_federation(tmp_path, n_sites=3, seed=0)
    schema, _ = infer_schema(read_tables([tmp_path]), [TaskRequest("readmission", "binary", "readmitted_30d")], ignore=("died_in_hospital",), statistics=True)
    rows = pd.concat(pd.read_csv(f / "train.csv") for f in folders)["age"]
    assert schema.statistics()["age"] == pytest.approx((rows.mean(), rows.std(ddof=0)), rel=1e-6)


def test_what_a_site_trains_is_decided_by_its_training_rows_alone():
    from fedmeta.data import Feature, TaskColumn

    tasks = [TaskColumn(name=n, kind="binary", label=n, classes=["0", "1"]) for n in ("seen_labels", "held_out_labels")]
    schema = Schema(name="t", features=[Feature(name="x", mean=0.0, std=1.0)], tasks=tasks)
    held = held_out_mask("clinic", 40, 0.25, seed=0)
    labels = {"seen_labels": np.where(held, np.nan, np.arange(40) % 2), "held_out_labels": np.where(held, np.arange(40) % 2, np.nan)}
    site = SiteData.from_arrays("clinic", schema, np.zeros((40, 1)), labels, 0.25, seed=0)
    assert site.tasks == ["seen_labels"]  # held-out rows without labels do not stop it from training
    assert site.scored_tasks == []  # ...but there is nothing to score it on


def test_a_head_trains_only_on_rows_the_split_rule_leaves_for_training(hospitals):
    from fedmeta.personalize import head_task, train_head
    from fedmeta.trained import TrainedModel

    site = hospital_federation(n_sites=1, seed=0)[0]
    frame = pd.read_csv(sorted(hospitals.glob("*.csv"))[0]).head(80).copy()
    frame["sepsis"] = np.where(frame["wbc"] > frame["wbc"].median(), "yes", "no")
    frame.loc[frame.index % 9 == 0, "sepsis"] = None  # rows without a label still count in the split
    held = held_out_mask("st-marys", len(frame), 0.25, seed=3)
    frame.loc[held, "age"] = 1e6  # a held-out age that any training on it would show in the head's range
    start = TrainedModel.initial(site.schema, (8,), seed=0)
    task = head_task(start.schema, "sepsis", "binary", None, None, frame, "rows.csv")
    result = train_head(start, task, frame, "rows.csv", steps=5, seed=3, site="st-marys")
    assert result.holdout_rows == int((held & frame["sepsis"].notna()).sum()) > 0
    assert result.feature_ranges["age"][1] < 1e3
    # The control: another site's split puts some of those rows in training.
    other = train_head(start, task, frame, "rows.csv", steps=5, seed=3, site="st-johns")
    assert other.feature_ranges["age"][1] >= 1e6
