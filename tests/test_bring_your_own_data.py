"""Bring your own data, end to end through the CLI: the README's commands, run verbatim, do what they promise.

Clinic folders (train.csv and, at all but one clinic, test.csv; two tasks, some
labels missing, from the hospital generator), ``fedmeta schema infer``,
training from a five-line config, ``fedmeta personalize --test`` (the default
choice) at every clinic into a site home of its own, ``fedmeta evaluate
--config`` with one clinic kept out, and one clinic's model served and asked
through ``/v1/predict`` and the v2 protocol. The bar for the personalized
scores, on the same scored rows: what each clinic builds alone (its own
cross-validated choice of logistic regression, gradient boosting and the MLP),
itself checked against the clinic's majority training label. The blocks run
once per test session, in the pasting folder (:mod:`readme_session`), shared
with ``test_readme.py``.
"""

import json
import re
import tomllib

import numpy as np
import pandas as pd
import pytest
import torch

from fedmeta.data.site import held_out_mask
from fedmeta.personalize import load_base
from fedmeta.registry import SiteHome

from readme_session import marked_block
from test_personalize_site_files import _personalize, clinics  # noqa: F401 (a fixture: three clinic folders and a base)


@pytest.mark.slow
@pytest.mark.xdist_group("readme")  # the README blocks' worker: its pasting folder already holds what they made
def test_the_readme_commands_train_personalize_and_evaluate_every_clinic_from_its_own_files(readme_session):
    block = marked_block("bring-your-own-data")
    done = readme_session.run_through(block)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    tmp_path = readme_session.folder

    clinics = sorted(p.name for p in (tmp_path / "clinics").iterdir() if p.is_dir())
    assert len(clinics) >= 4
    tested = [c for c in clinics if (tmp_path / "clinics" / c / "test.csv").exists()]
    assert len(tested) == len(clinics) - 1, "one clinic goes without its optional test file"
    # The five-line config trained every clinic found; the run folder says how many.
    assert tomllib.loads((tmp_path / "runs" / "clinics" / "config.toml").read_text())["federation"]["n_sites"] == len(clinics)
    assert f"({len(clinics)} sites found, {len(tested)} with a test file)" in output
    # What the five lines leave unset is chosen from the rows, printed, and kept with the run.
    assert re.search(r"^default from the data: model\.hidden = \[\d+, \d+\] \([\d,]+ training rows over \d+ sites\)", done.stdout, re.M)
    assert "local.shots" in (tmp_path / "runs" / "clinics" / "defaults.json").read_text()
    # Progress: a loss every round, with the time left.
    trained = done.stdout.split("\nbase model: ", 1)[0]  # fedmeta train's output (evaluate trains again, later)
    assert re.search(r"^round 1/10  loss \d+\.\d{4}  \d+\.\d s  ETA after the next round", trained, re.M), trained  # round 1 includes start-up
    assert re.search(r"^round 2/10  loss \d+\.\d{4}  \d+\.\d s  ETA \d", trained, re.M), trained
    assert len(re.findall(r"^round \d+/10  loss ", trained, re.M)) == 10

    # Normalization: `schema infer` left it to the federation, whose sites sent sums at the roll call; the base
    # carries the result, which is pandas' mean and population std over every clinic's training rows (test files
    # and held-out rows take no part), and every personalized model normalizes its inputs with it.
    schema = json.loads((tmp_path / "clinics" / "schema.json").read_text())
    assert all(f["mean"] is None and f["std"] is None for f in schema["features"])
    federation = tomllib.loads((tmp_path / "runs" / "clinics" / "config.toml").read_text())["federation"]

    def training_rows(clinic: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The clinic's rows that trained, and those it is scored on: its test.csv, else the rows training held out of train.csv."""
        train = pd.read_csv(tmp_path / "clinics" / clinic / "train.csv")
        if clinic in tested:
            return train, pd.read_csv(tmp_path / "clinics" / clinic / "test.csv")
        held = held_out_mask(clinic, len(train), federation["test_fraction"], federation["seed"])
        return train[~held], train[held]

    rows = pd.concat(training_rows(clinic)[0] for clinic in clinics)
    normalization = torch.load(tmp_path / "runs" / "clinics" / "base_model.pt", weights_only=True)["normalization"]
    numeric = [f["name"] for f in schema["features"] if f["type"] == "numeric"]
    assert sorted(normalization) == sorted(numeric)
    for name in numeric:
        assert normalization[name] == pytest.approx([rows[name].mean(), rows[name].std(ddof=0)], rel=1e-6), name

    # Each clinic has a site home of its own (Concepts: a site home is one site's folder), and ./site-home none of them.
    assert sorted(p.name for p in (tmp_path / "site-homes").iterdir()) == clinics
    assert not set(clinics) & set(SiteHome(tmp_path / "site-home").registry.sites())
    base_acc, personalized_acc, alone_acc, majority_acc = [], [], [], []
    for clinic in clinics:
        home = SiteHome(tmp_path / "site-homes" / clinic)
        assert home.registry.sites() == [clinic]
        version = home.registry.current(clinic)
        assert version is not None, f"{clinic} has no promoted model"
        manifest, _ = home.load(version)
        train, test = training_rows(clinic)
        if clinic not in tested:  # scored on the rows training held out of its train.csv, and said so
            assert f"note: test file clinics/{clinic}/test.csv not found" in " ".join(done.stderr.split())
        assert manifest.data["held_out"] == len(test) and manifest.data["rows"] == len(train) + (0 if clinic in tested else len(test))
        assert manifest.training["mode"].startswith("chosen:"), manifest.training["mode"]  # the default choice
        assert {f["name"]: [f["mean"], f["std"]] for f in manifest.schema_["features"] if f["type"] == "numeric"} == normalization
        labels = {t["name"]: t["label"] for t in manifest.schema_["tasks"]}
        for task in (t.name for t in manifest.tasks if t.personalized):
            base_acc.append(manifest.metrics[f"{task}.base.acc"])
            personalized_acc.append(manifest.metrics[f"{task}.personalized.acc"])
            # The bar: what the clinic builds alone on the same train.csv (logistic regression, gradient boosting or
            # the MLP, picked by its own cross-validation), scored on the same test rows.
            alone_acc.append(manifest.metrics[f"{task}.alone.acc"])
            majority = train[labels[task]].dropna().mode()[0]
            majority_acc.append(float((test[labels[task]].dropna() == majority).mean()))
    print(f"mean test accuracy over {len(base_acc)} clinic-tasks: majority label {np.mean(majority_acc):.4f}, "
          f"base {np.mean(base_acc):.4f}, alone {np.mean(alone_acc):.4f}, personalized {np.mean(personalized_acc):.4f}")
    assert np.mean(alone_acc) > np.mean(majority_acc) + 0.04, "the local bar is a real model, not the majority label"
    # Measured level: 0.8159 personalized against 0.8156 alone (base 0.756). Runs differ by about 0.002 with the order
    # Flower aggregates replies in, so "level" is held to within half a point, the tolerance for the worst tenth.
    assert np.mean(personalized_acc) >= np.mean(alone_acc) - 0.005, "clinics are worse off on average than alone"

    # fedmeta evaluate --config: the same clinics, clinic_006 kept out of every method's training.
    results = json.loads((tmp_path / "runs" / "clinics-evaluation" / "results.json").read_text())
    assert results["sites"] == {"seen": len(clinics) - 1, "unseen": 1}
    for method in ("local_only", "pooled", "fedavg", "fedavg_ft", "fedmeta_fomaml", "fedmeta_fomaml_global"):
        per_site = results["methods"][method]["per_site"]
        assert sorted(per_site["seen"]) == [c for c in clinics if c != "clinic_006"], method
        assert list(per_site["unseen"]) == ["clinic_006"], method
    assert tomllib.loads((tmp_path / "runs" / "clinics-evaluation" / "runs" / "fomaml" / "config.toml").read_text())["federation"]["n_sites"] == len(clinics) - 1
    assert (tmp_path / "runs" / "clinics-evaluation" / "report.md").exists()
    assert f"{len(clinics) - 1} sites train, 1 never take part (unseen); {len(tested)} scored on their test file" in output


@pytest.mark.slow
def test_a_site_folder_without_its_optional_test_file_is_scored_on_rows_held_out_of_its_training_file(clinics, tmp_path):
    # The README's loop passes every folder's test.csv; a site that has none is personalized, with a note, not stopped.
    folder = clinics / "data" / "clinic_000"
    missing = tmp_path / "clinic_000" / "test.csv"
    result = _personalize(clinics, tmp_path / "home", "clinic_000", "--test", missing, "--no-alone", "--mode", "all", "--shots", "2", "--steps", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note: test file {missing} not found" in " ".join(result.stderr.split()), result.stderr
    home = SiteHome(tmp_path / "home")
    manifest, _ = home.load(home.registry.current("clinic_000"))
    train = pd.read_csv(folder / "train.csv")
    federation = load_base(clinics / "run").config.federation
    expected = held_out_mask("clinic_000", len(train), federation.test_fraction, federation.seed)  # the rows training held out
    assert manifest.data["rows"] == len(train) and manifest.data["held_out"] == int(expected.sum()) > 0
    assert "test_file" not in manifest.data and "scores on held-out rows" in " ".join(result.stdout.split())


@pytest.mark.slow
@pytest.mark.xdist_group("readme")
def test_the_readme_serves_one_clinic_and_answers_a_whole_record_and_a_v2_request_alike(readme_session):
    done = readme_session.run_through(marked_block("bring-your-own-data-requests"))
    assert done.returncode == 0, done.stdout + done.stderr
    v1, v2 = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    home = SiteHome(readme_session.folder / "site-homes" / "clinic_003")
    promoted = home.registry.current("clinic_003")
    assert v1["model"]["site"] == "clinic_003" and v1["model"]["sha256"] == promoted.sha256
    assert v1["ignored_fields"] == ["patient_id"], "a whole record is answered, its other fields named"
    assert (v2["model_name"], v2["model_version"]) == ("clinic_003", v1["model"]["version"])
    tasks = {t["name"] for t in home.load(promoted)[0].schema_["tasks"]}
    assert set(v1["predictions"]) == {o["name"] for o in v2["outputs"]} == tasks
    for output in v2["outputs"]:  # one record, two protocols, one model: the same probabilities
        assert output["data"] == pytest.approx(v1["predictions"][output["name"]]["probabilities"][0], abs=1e-6)
