"""The Python API: a site's promoted model scores a DataFrame in one call, exactly as ``fedmeta predict`` does."""

import doctest
import subprocess
import sys

import pandas as pd
import pytest

import fedmeta.predict
from fedmeta.data.synthetic import write_clinic_federation
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir
from fedmeta.registry import RegistryError

QUICK = ("--mode", "head", "--shots", "10", "--steps", "5", "--no-alone")  # a promoted model in seconds: heads only, no fit of the site alone


def fedmeta_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder as the docstring assumes: clinics/ with a schema, and site-home/ with clinic_003's promoted model."""
    root = tmp_path_factory.mktemp("api")
    write_clinic_federation(root / "clinics", n_sites=4, seed=0)
    tasks = ["--task", "readmission:binary:readmitted_30d", "--task", "mortality:binary:died_in_hospital"]
    assert fedmeta_cli("schema", "infer", root / "clinics", *tasks, "--out", root / "clinics" / "schema.json").returncode == 0
    config = RunConfig.from_dict({"name": "base", "model": {"hidden": [8]}, "federation": {"kind": "csv", "data_dir": str(root / "clinics")}})
    RunDir(root / "run").create(config)
    RunDir(root / "run").save_base_model(initial_state(config), config, round_=1)
    site = root / "clinics" / "clinic_003"
    done = fedmeta_cli("personalize", "--data", site / "train.csv", "--test", site / "test.csv", "--schema", root / "clinics" / "schema.json",
                       "--base", root / "run", "--site-home", root / "site-home", *QUICK)  # any promoted model does
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_the_docstring_example_runs_on_a_real_site_home(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    parser = doctest.DocTestParser()
    examples = parser.get_examples(fedmeta.predict.__doc__)
    assert len(examples) == 5
    namespace = {}
    for example in examples:
        exec(compile(example.source, "fedmeta.predict example", "exec"), namespace)
    assert eval(examples[-1].source, namespace) == eval(examples[-1].want, {})


def test_one_call_matches_fedmeta_predict_row_for_row(workspace, tmp_path):
    rows = pd.read_csv(workspace / "clinics" / "clinic_001" / "test.csv")  # another clinic's rows, labels ignored
    rows.to_csv(tmp_path / "rows.csv", index=False)
    api = fedmeta.predict.predict(rows, site_home=workspace / "site-home", site="clinic_003")
    cli = fedmeta_cli("predict", "--data", tmp_path / "rows.csv", "--site-home", workspace / "site-home", "--out", tmp_path / "cli.csv")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    written = pd.read_csv(tmp_path / "cli.csv", dtype={"mortality": str, "readmission": str})
    assert len(api) == len(rows) and list(api.columns) == list(written.columns)
    assert list(api["mortality"]) == list(written["mortality"])
    assert (api["mortality.p_1"] - written["mortality.p_1"]).abs().max() < 1e-5  # the CLI writes 6 significant digits


def test_a_missing_site_home_is_a_clear_error(tmp_path):
    with pytest.raises(RegistryError, match="no site home at"):
        fedmeta.predict.load_promoted(tmp_path / "nowhere")
