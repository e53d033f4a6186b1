"""`fedmeta predict`: offline batch scoring with a site's promoted model, verified against the registry."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.registry import SiteHome

runner = CliRunner()
QUICK = ("--mode", "head", "--shots", "10", "--steps", "5", "--no-alone")  # a promoted model in seconds: heads only, no fit of the site alone


@pytest.fixture(scope="module")
def site_home(tmp_path_factory, hospitals, base_run):
    home = tmp_path_factory.mktemp("predict-home")
    args = ["personalize", "--data", str(hospitals / "hospital_002.csv"), "--schema", str(hospitals / "schema.json"), "--base", str(base_run)]
    assert runner.invoke(app, args + ["--site-home", str(home), *QUICK]).exit_code == 0
    return home


def test_predict_scores_every_row_as_the_server_would(site_home, hospitals, tmp_path):
    from serving.predict import render
    from serving.store import load_model

    rows = pd.read_csv(hospitals / "hospital_001.csv").head(50)  # another site's rows, labels included (ignored)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    out = tmp_path / "preds.csv"
    result = runner.invoke(app, ["predict", "--data", str(tmp_path / "rows.csv"), "--site-home", str(site_home), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 50 predictions" in result.output and "v2" in result.output
    preds = pd.read_csv(out, dtype={"mortality": str, "readmission_30d": str})
    assert len(preds) == 50

    home = SiteHome(site_home)
    model = load_model(home, home.current(), max_rows=100)
    feed, _ = model.validator.columns(rows[model.validator.features].to_dict(orient="records"))
    served = render(model, model.tasks, model.session.run(model.tasks, feed))
    assert list(preds["mortality"]) == served["mortality"]["labels"]
    assert np.allclose(preds[[f"mortality.p_{c}" for c in served["mortality"]["classes"]]].to_numpy(), served["mortality"]["probabilities"], atol=1e-5)
    assert np.allclose(preds["length_of_stay"].to_numpy(), np.asarray(served["length_of_stay"]["values"]).reshape(-1), rtol=1e-5)


def test_predict_writes_csv_to_standard_output_without_out(site_home, hospitals, tmp_path):
    pd.read_csv(hospitals / "hospital_000.csv").head(3).to_csv(tmp_path / "rows.csv", index=False)
    result = runner.invoke(app, ["predict", "--data", str(tmp_path / "rows.csv"), "--site-home", str(site_home)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 4 and {"mortality", "mortality.p_1", "length_of_stay"} <= set(lines[0].split(","))


def test_predict_refuses_a_model_file_that_differs_from_the_registry(site_home, hospitals, tmp_path):
    home = SiteHome(site_home)
    model = home.folder(home.current()) / "model.onnx"
    genuine = model.read_bytes()
    try:
        model.write_bytes(genuine + b"\0")
        pd.read_csv(hospitals / "hospital_000.csv").head(3).to_csv(tmp_path / "rows.csv", index=False)
        result = runner.invoke(app, ["predict", "--data", str(tmp_path / "rows.csv"), "--site-home", str(site_home)])
        assert result.exit_code == 1
        assert "model.onnx does not match the hash the registry recorded" in " ".join(result.output.split())
    finally:
        model.write_bytes(genuine)


def test_predict_names_the_missing_column(site_home, hospitals, tmp_path):
    pd.read_csv(hospitals / "hospital_000.csv").head(3).drop(columns=["age"]).to_csv(tmp_path / "rows.csv", index=False)
    result = runner.invoke(app, ["predict", "--data", str(tmp_path / "rows.csv"), "--site-home", str(site_home)])
    assert result.exit_code == 2 and "rows.csv: missing feature column(s) ['age']" in " ".join(result.output.split())
