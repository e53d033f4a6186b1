"""A short config gets its sizes from the data (issue 14, item 3): checked against counts taken with pandas from the files."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedmeta.data.synthetic import write_clinic_federation
from fedmeta.fl.config import RunConfig
from fedmeta.fl.data_defaults import choose
from fedmeta.fl.sites import prepare_federation

LABELS = {"readmission": "readmitted_30d", "mortality": "died_in_hospital"}


def _clinics(root, n_sites):
    write_clinic_federation(root, n_sites=n_sites, seed=2)
    tasks = [a for name, label in LABELS.items() for a in ("--task", f"{name}:binary:{label}")]
    done = subprocess.run([sys.executable, "-m", "fedmeta.cli", "schema", "infer", str(root), *tasks, "--out", str(root / "schema.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _by_hand(root):
    """Training rows, each site-task's smallest class and labelled rows, from the train files (every test file is held out)."""
    rows, smallest, labelled = 0, [], []
    for train in sorted(root.glob("*/train.csv")):
        frame = pd.read_csv(train)
        test = pd.read_csv(train.with_name("test.csv"))
        rows += len(frame)
        for label in LABELS.values():
            counts = frame[label].dropna().value_counts()
            if counts.sum() >= 4 and test[label].notna().sum() >= 2:  # a task the site trains (SiteData.tasks)
                smallest.append(int(counts.min()))
                labelled.append(int(counts.sum()))
    return rows, smallest, labelled


def test_a_five_line_config_is_sized_from_the_rows_and_a_set_value_is_kept(tmp_path):
    _clinics(tmp_path / "clinics", n_sites=6)
    given = RunConfig.from_dict({"name": "c", "rounds": 3, "federation": {"kind": "csv", "data_dir": str(tmp_path / "clinics")}, "local": {"shots": 2}})
    prepared, sites = prepare_federation(given)
    config, chosen = choose(prepared, sites, given)

    rows, smallest, labelled = _by_hand(tmp_path / "clinics")
    width = 32 if rows < 2000 else 64 if rows < 100_000 else 128
    k = int(np.clip(int(np.median(smallest)) // 3, 1, 5))
    assert config.model.hidden == [width, width]
    assert config.evaluation.shots == k
    assert config.local.shots == 2  # set in the config: never changed
    assert config.local.query_size == int(np.clip(int(np.median(labelled)) // 4, 4, 16))
    assert {c.key for c in chosen} == {"model.hidden", "evaluation.shots", "local.query_size"}
    assert f"{rows:,} training rows over {len(sites)} sites" in next(c.why for c in chosen if c.key == "model.hidden")
    # The control: a config that sets everything gets nothing chosen.
    full = RunConfig.from_dict({**given.model_dump(mode="json"), "model": {"hidden": [8]}, "local": {"shots": 2, "query_size": 9}, "evaluation": {"shots": 3}})
    again, none = choose(prepare_federation(full)[0], sites, full)
    assert none == [] and again.model.hidden == [8] and again.local.query_size == 9 and again.evaluation.shots == 3


@pytest.mark.slow
def test_train_prints_the_choices_and_the_run_folder_keeps_them_for_a_resume(tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app
    from fedmeta.fl.run_dir import RunDir

    _clinics(tmp_path / "clinics", n_sites=4)
    (tmp_path / "c.toml").write_text(f'name = "c"\nrounds = 1\n[federation]\nkind = "csv"\ndata_dir = "{tmp_path / "clinics"}"\n')
    done = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "c.toml"), "--run-dir", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    assert "default from the data: model.hidden = [32, 32] (1,323 training rows over 4 sites)" in done.output  # docs/configuration.md quotes this line
    saved = RunDir(tmp_path / "run").load_config()
    assert saved.model.hidden == [32, 32] and "model.hidden" in (tmp_path / "run" / "defaults.json").read_text()
    resumed = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), "--rounds", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert "default from the data" not in resumed.output and RunDir(tmp_path / "run").load_config().model.hidden == [32, 32]


def test_the_documented_table_is_the_configuration_every_key_described():
    from pathlib import Path

    from fedmeta.fl.config_reference import markdown, rows

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    table = page.split("<!-- config-reference -->\n", 1)[1].split("<!-- /config-reference -->", 1)[0]
    assert table == markdown(), "docs/configuration.md's reference is stale: paste fedmeta.fl.config_reference.markdown() between its markers"
    assert all(description for _, _, description in rows()), [key for key, _, d in rows() if not d]
    assert "`federation.data_dir`" in table and "`simulation.attack`" in table
