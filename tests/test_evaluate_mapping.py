"""fedmeta evaluate reads a federation folder's sites through their mapping.json and refuses mappings under review, as training does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.data.mapping import ColumnMapping
from fedmeta.data.schema import SchemaProblems
from fedmeta.evaluate.federations import folder_federation
from fedmeta.evaluate.harness import federated
from fedmeta.fl.sites import prepare_federation
from test_mapping_sites import canonical_rows, csv_config, dialect_mapping, dialect_rows, heart_schema, write_site


@pytest.fixture
def federation(tmp_path) -> Path:
    """Two sites: st-marys in its own dialect, with a mapping whose Sex column a person has yet to confirm; north in the schema's."""
    unsure = dialect_mapping(heart_schema(), Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, confidence=0.55, review=True))
    write_site(tmp_path / "fed", "st-marys", dialect_rows(canonical_rows(24)), unsure)
    write_site(tmp_path / "fed", "north", canonical_rows(24))
    return tmp_path / "fed"


def test_evaluation_refuses_a_mapping_under_review_in_the_words_of_training(federation, tmp_path):
    with pytest.raises(SchemaProblems) as evaluation:
        folder_federation(federation, tmp_path / "evaluate", unseen=[])
    with pytest.raises(SchemaProblems) as training:
        prepare_federation(csv_config(federation))
    assert evaluation.value.lines == training.value.lines
    [line] = evaluation.value.lines
    assert line.startswith(f"{federation / 'st-marys' / 'mapping.json'}: site 'st-marys' has 1 column(s) flagged for review: column 'Sex' -> 'sex'")
    assert not (tmp_path / "evaluate").exists()  # refused before anything was linked


def test_a_site_kept_unseen_is_refused_too(federation, tmp_path):
    with pytest.raises(SchemaProblems, match="site 'st-marys' has 1 column"):
        folder_federation(federation, tmp_path / "evaluate", unseen=["st-marys"])


def test_accept_review_reads_the_site_through_its_mapping_and_keeps_what_was_accepted(federation, tmp_path):
    fed = folder_federation(federation, tmp_path / "evaluate", unseen=[], accept_review=True)
    [line] = fed.review_accepted
    assert line.startswith(f"{federation / 'st-marys' / 'mapping.json'}: site 'st-marys'")
    north, st_marys = fed.seen
    assert st_marys.name == "st-marys" and st_marys.n_rows == north.n_rows == 24
    # The same patients: renamed, recoded and converted from mmol/L, st-marys encodes as its canonical twin (float32 rounding aside).
    np.testing.assert_allclose(st_marys.x, north.x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(st_marys.labels["disease"], north.labels["disease"])


def test_fedmeta_evaluate_refuses_review_in_one_line_naming_the_mapping(federation, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'name = "x"\nrounds = 1\n[federation]\nkind = "csv"\ndata_dir = "{federation}"\n[server]\nmin_sites = 1\n')
    result = CliRunner().invoke(app, ["evaluate", "--config", str(config), "--out", str(tmp_path / "out"), "--no-peers"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"{federation / 'st-marys' / 'mapping.json'}: site 'st-marys' has 1 column(s) flagged for review" in errors[0]
    assert "Traceback" not in result.output and not (tmp_path / "out" / "stages").exists()


def test_accept_review_without_a_federation_folder_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--accept-review", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--accept-review" in result.output and "--config" in result.output


@pytest.mark.slow  # a real Flower run (about 50 s on a shared 2-core machine): training refuses the mapping unless evaluation passes the acceptance on
def test_the_methods_train_on_the_sites_whose_review_was_accepted(federation, tmp_path):
    fed = folder_federation(federation, tmp_path / "evaluate", unseen=[], accept_review=True)
    [plain, tuned] = federated(fed, "fedavg", rounds=1, hidden=(4,), shots=2, runs_dir=tmp_path / "runs", seed=0, progress=lambda m: None,
                               shots_curve=False)
    assert set(tuned.seen) == {"north", "st-marys"}
