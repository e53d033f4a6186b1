"""``fedmeta personalize`` on a real site's files: named by its folder, scored on its own test file, and ``--shots all``."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from fedmeta.data import Schema, load_federation, load_site
from fedmeta.data.synthetic import write_clinic_federation
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir
from fedmeta.personalize import PersonalizationError, load_base, personalize
from fedmeta.registry import SiteHome
from fedmeta.scoring import task_scores

TASKS = ["--task", "readmission:binary:readmitted_30d", "--task", "mortality:binary:died_in_hospital"]


def fedmeta(*args):
    return subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def clinics(tmp_path_factory):
    """Clinic folders with a schema that leaves normalization to the federation, and a round-0 base model in
    run-folder format carrying the statistics a federation of these clinics computes."""
    root = tmp_path_factory.mktemp("clinics")
    write_clinic_federation(root / "data", n_sites=3, seed=1)
    assert fedmeta("schema", "infer", root / "data", *TASKS, "--out", root / "data" / "schema.json").returncode == 0
    config = RunConfig.from_dict({"name": "base", "model": {"hidden": [16]}, "federation": {"kind": "csv", "data_dir": str(root / "data")}})
    run = RunDir(root / "run")
    run.create(config)
    statistics = load_federation(root / "data")[0].schema.statistics()
    assert "age" in statistics and "sodium" in statistics
    run.save_base_model(initial_state(config), config, round_=1, statistics=statistics)
    return root


def _site(clinics, name):
    """A clinic's rows as the base sees them: loaded with the schema the base normalizes (the documented API)."""
    folder = clinics / "data" / name
    schema = load_base(clinics / "run").schema_for(Schema.load(clinics / "data" / "schema.json"))
    return load_site(folder / "train.csv", schema, test_path=folder / "test.csv")


def _personalize(clinics, home, site, *extra):
    folder = clinics / "data" / site
    return fedmeta("personalize", "--data", folder / "train.csv", "--schema", clinics / "data" / "schema.json", "--base", clinics / "run",
                   "--site-home", home, *extra)


@pytest.mark.slow
def test_the_site_is_named_by_its_folder_and_scored_on_its_test_file_only(clinics, tmp_path):
    test_file = clinics / "data" / "clinic_001" / "test.csv"
    result = _personalize(clinics, tmp_path, "clinic_001", "--test", test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    home = SiteHome(tmp_path)
    version = home.registry.current("clinic_001")
    manifest, _ = home.load(version)
    test = pd.read_csv(test_file)
    train = pd.read_csv(clinics / "data" / "clinic_001" / "train.csv")
    assert manifest.data["held_out"] == len(test) and manifest.data["rows"] == len(train)
    assert manifest.data["test_file"] == str(test_file.resolve()) and "test_fraction" not in manifest.data
    # The base's score in the table is the base model's score on the test file's labelled rows: measured here again.
    base = load_base(clinics / "run")
    site = _site(clinics, "clinic_001")
    trained = base.for_schema(site.schema)
    for task, label in (("mortality", "died_in_hospital"), ("readmission", "readmitted_30d")):
        x, y = site.split(task, train=False)
        assert len(y) == test[label].notna().sum()
        assert manifest.metrics[f"{task}.base.acc"] == pytest.approx(task_scores(trained.module(), trained.params, task, x, y)["acc"])
    assert "test.csv" in result.stdout  # the table's title says which rows it scores


def test_shots_all_uses_every_labelled_training_row_and_chooses_its_steps_on_validation_rows(clinics):
    base = load_base(clinics / "run")
    folder = clinics / "data" / "clinic_002"
    site = _site(clinics, folder.name)
    result = personalize(base.for_schema(site.schema), site, shots="all", steps="auto", seed=0)
    labelled = sum(site.n_labelled(t, train=True) for t in result.tasks)
    selection = result.steps_selection
    assert selection["rows"] == labelled and 0 < selection["validation_rows"] < labelled
    assert result.steps == min(selection["curve"], key=selection["curve"].get)
    assert selection["stopped_at"] >= result.steps
    again = personalize(base.for_schema(site.schema), site, shots="all", steps="auto", seed=0)
    assert all(torch.equal(result.model.params[k], again.model.params[k]) for k in result.model.params)  # same seed, same model
    # The chosen step count never does worse than the base on the validation rows (0 steps is a candidate) ...
    assert selection["curve"][result.steps] <= selection["curve"][0]
    # ... and, against the untrained base as control, it does not lose ranking quality on the test file.
    for task in result.tasks:
        assert result.metrics[f"{task}.personalized.auc"] > result.metrics[f"{task}.base.auc"] - 0.02


@pytest.mark.slow
def test_shots_all_through_the_cli_records_it_and_the_rows(clinics, tmp_path):
    folder = clinics / "data" / "clinic_000"
    result = _personalize(clinics, tmp_path, "clinic_000", "--test", folder / "test.csv", "--shots", "all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clinic_000: all" in result.stdout and "early-stopped on a validation fifth" in " ".join(result.stdout.split())
    manifest, _ = SiteHome(tmp_path).load(SiteHome(tmp_path).registry.current("clinic_000"))
    assert manifest.shots is None and manifest.training["shots"] == "all" and manifest.training["steps_selection"]["validation_rows"] > 0
    # The Python API with its defaults does what the command does (it once fine-tuned all rows at the K-shot rate, 0.05).
    site = _site(clinics, folder.name)
    api = personalize(load_base(clinics / "run").for_schema(site.schema), site, shots="all", steps="auto")
    assert (api.lr, api.steps) == (manifest.training["lr"], manifest.training["steps"]) and api.lr == 0.001


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--test-fraction", "0.3"], "error: --test-fraction has no effect with --test"),
        (["--shots", "many"], "error: --shots must be a number >= 1 or 'all', got 'many'"),
        (["--shots", "all", "--mode", "metasgd"], "error: mode 'metasgd' adapts with the rates learned for K-shot steps"),
    ],
)
def test_bad_personalization_requests_are_one_line(clinics, tmp_path, extra, expected):
    folder = clinics / "data" / "clinic_000"
    result = _personalize(clinics, tmp_path, "clinic_000", "--test", folder / "test.csv", *extra)
    assert result.returncode == 2 and expected in " ".join(result.stdout.split()), result.stdout + result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.slow
def test_the_site_is_normalized_as_the_federation_was_and_a_schema_stating_other_statistics_is_refused(clinics, tmp_path):
    base = load_base(clinics / "run")
    folder = clinics / "data" / "clinic_002"
    result = _personalize(clinics, tmp_path / "home", "clinic_002", "--test", folder / "test.csv")
    assert result.returncode == 0, result.stdout + result.stderr
    home = SiteHome(tmp_path / "home")
    manifest, _ = home.load(home.registry.current("clinic_002"))
    published = {f["name"]: (f["mean"], f["std"]) for f in manifest.schema_["features"] if f["type"] == "numeric"}
    assert published == base.statistics, "the published model normalizes inputs with the federation's statistics"

    # A schema stating its own mean for a feature (computed at one site, say) would feed the model shifted rows.
    stated = Schema.load(clinics / "data" / "schema.json")
    mean, std = base.statistics["sodium"]
    stated = stated.with_statistics({"sodium": (mean + 2.0, std)})
    stated.save(tmp_path / "stated.json")
    refused = fedmeta("personalize", "--data", folder / "train.csv", "--test", folder / "test.csv", "--schema", tmp_path / "stated.json",
                      "--base", clinics / "run", "--site-home", tmp_path / "refused")
    out = " ".join(refused.stdout.split())
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"feature 'sodium' has mean {mean + 2.0:.6g}, std {std:.6g}, but base model" in out and f"trained with mean {mean:.6g}" in out
    assert "Traceback" not in refused.stdout + refused.stderr and SiteHome(tmp_path / "refused").registry.current("clinic_002") is None
    # The same schema with the base's own values is accepted.
    assert base.schema_for(stated.with_statistics({"sodium": (mean, std)})).statistics() == base.statistics

    # From Python, rows loaded with the schema as written (raw values) are refused rather than scored.
    raw = load_site(folder / "train.csv", clinics / "data" / "schema.json", test_path=folder / "test.csv")
    with pytest.raises(PersonalizationError, match="feature 'age' was normalized with no statistics"):
        personalize(base.for_schema(raw.schema), raw, shots=5)
