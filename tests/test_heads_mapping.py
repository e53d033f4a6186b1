"""fedmeta heads add reads a department's rows through the site's mapping.json, as fedmeta personalize does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.data import load_federation
from fedmeta.data.mapping import ColumnMapping, Mapping
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir
from fedmeta.registry import SiteHome
from fedmeta.trained import TrainedModel
from test_mapping_sites import canonical_rows, dialect_mapping, dialect_rows, heart_schema, write_site

runner = CliRunner()
HEAD = ["--task", "disease", "--steps", "30", "--seed", "3", "--site", "st-marys"]


@pytest.fixture(scope="module")
def site_home(tmp_path_factory) -> Path:
    """A site home whose promoted version is st-marys personalized from a round-1 base of the heart federation."""
    root = tmp_path_factory.mktemp("heads-heart")
    write_site(root / "fed", "st-marys", canonical_rows(40))
    config = RunConfig.from_dict({"name": "base", "model": {"hidden": [8]}, "federation": {"kind": "csv", "data_dir": str(root / "fed")}})
    run = RunDir(root / "run")
    run.create(config)
    run.save_base_model(initial_state(config), config, round_=1, statistics=load_federation(root / "fed")[0].schema.statistics())
    result = runner.invoke(app, ["personalize", "--data", str(root / "fed" / "st-marys" / "train.csv"), "--schema", str(root / "fed" / "schema.json"),
                                 "--base", str(root / "run"), "--site-home", str(root / "home"), "--mode", "all", "--shots", "4", "--steps", "5",
                                 "--no-alone"])
    assert result.exit_code == 0, result.output
    return root / "home"


@pytest.fixture
def department(tmp_path) -> dict[str, Path]:
    """The same 32 patients a department sends for its head: in the schema's dialect, and in the site's own beside its mapping.json."""
    rows = canonical_rows(32)
    (tmp_path / "canonical").mkdir()
    (tmp_path / "dialect").mkdir()
    rows.to_csv(tmp_path / "canonical" / "rows.csv", index=False, float_format="%.17g")
    dialect_rows(rows).to_csv(tmp_path / "dialect" / "rows.csv", index=False, float_format="%.17g")
    dialect_mapping(heart_schema()).save(tmp_path / "dialect" / "mapping.json")
    return {"canonical": tmp_path / "canonical" / "rows.csv", "dialect": tmp_path / "dialect" / "rows.csv"}


def own_home(site_home: Path, folder: Path) -> Path:
    """A copy of the site home, so each head starts from the same promoted version."""
    shutil.copytree(site_home, folder)
    return folder


def add_head(home: Path, data: Path, *extra: str):
    return runner.invoke(app, ["heads", "add", *HEAD, "--data", str(data), "--site-home", str(home), *extra])


def newest(home: Path):
    site_home = SiteHome(home)
    version = max(site_home.registry.versions("st-marys"), key=lambda v: v.version)
    return site_home, version


def head_params(home: Path) -> dict[str, torch.Tensor]:
    site_home, version = newest(home)
    assert version.kind == "head"
    _, state = site_home.load(version, "state.pt")
    return TrainedModel.from_bytes(state, "state.pt").state["params"]


def test_a_head_from_the_sites_own_rows_and_mapping_equals_the_head_from_the_canonical_rows(site_home, department, tmp_path):
    canonical, dialect = own_home(site_home, tmp_path / "a"), own_home(site_home, tmp_path / "b")
    assert add_head(canonical, department["canonical"]).exit_code == 0
    result = add_head(dialect, department["dialect"])  # mapping.json beside --data is picked up
    assert result.exit_code == 0, result.output
    a, b = head_params(canonical), head_params(dialect)
    assert a.keys() == b.keys()
    for name, weights in a.items():
        # mmol/L * 38.67 is the mg/dL value up to float64 rounding.
        torch.testing.assert_close(b[name], weights, rtol=1e-5, atol=1e-6, msg=name)
    _, version_a = newest(canonical)
    _, version_b = newest(dialect)
    assert "disease.head.acc" in version_a.metrics  # scored on held-out rows, so the labels went through the mapping too
    assert version_b.metrics == pytest.approx(version_a.metrics, abs=1e-5)


def test_the_head_records_the_mapping_it_read_its_rows_with(site_home, department, tmp_path):
    home = own_home(site_home, tmp_path / "home")
    assert add_head(home, department["dialect"]).exit_code == 0
    site_home_, version = newest(home)
    recorded = Mapping.load(department["dialect"].with_name("mapping.json"))
    assert Mapping.model_validate(site_home_.load(version)[0].mapping) == recorded
    assert version.lineage["data"]["mapping_sha256"] == recorded.digest()


def test_a_new_tasks_label_column_is_read_as_the_site_writes_it(site_home, department, tmp_path):
    rows = pd.read_csv(department["dialect"])
    rows["readmit"] = np.arange(len(rows)) % 2
    rows.to_csv(department["dialect"], index=False)
    home = own_home(site_home, tmp_path / "home")
    result = runner.invoke(app, ["heads", "add", "--task", "readmit", "--kind", "binary", "--steps", "5", "--data", str(department["dialect"]),
                                 "--site-home", str(home)])
    assert result.exit_code == 0, result.output
    _, version = newest(home)
    assert version.kind == "head" and "readmit.head.acc" in version.metrics


def test_a_head_above_a_new_task_checks_the_mapping_against_the_federations_schema(site_home, department, tmp_path):
    rows = pd.read_csv(department["dialect"])
    rows["readmit"] = np.arange(len(rows)) % 2
    rows.to_csv(department["dialect"], index=False)
    home = own_home(site_home, tmp_path / "home")
    new_task = ["heads", "add", "--task", "readmit", "--kind", "binary", "--steps", "5", "--data", str(department["dialect"]), "--site-home", str(home)]
    assert runner.invoke(app, [*new_task, "--promote"]).exit_code == 0
    # The promoted model's schema now has a task the mapping was not made for; its digest still names the federation's schema.
    result = add_head(home, department["dialect"])
    assert result.exit_code == 0, result.output
    _, version = newest(home)
    assert {t.name for t in SiteHome(home).load(version)[0].tasks} == {"disease", "readmit"}


def test_a_mapping_under_review_is_refused_in_one_line_and_accept_review_is_audited(site_home, department, tmp_path):
    unsure = dialect_mapping(heart_schema(), Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, confidence=0.55, review=True))
    unsure.save(tmp_path / "unsure.json")
    home = own_home(site_home, tmp_path / "home")
    before = len(SiteHome(home).registry.versions("st-marys"))

    refused = add_head(home, department["dialect"], "--mapping", str(tmp_path / "unsure.json"))
    assert refused.exit_code == 2
    [line] = [line for line in refused.output.splitlines() if line.strip()]
    assert line.startswith("error") and f"{tmp_path / 'unsure.json'}: 1 column(s) flagged for review ('Sex')" in line
    assert len(SiteHome(home).registry.versions("st-marys")) == before

    accepted = add_head(home, department["dialect"], "--mapping", str(tmp_path / "unsure.json"), "--accept-review")
    assert accepted.exit_code == 0, accepted.output
    assert f"accepted without review (--accept-review): {tmp_path / 'unsure.json'}: column 'Sex' -> 'sex'" in accepted.output.replace("\n", "")
    site_home_, version = newest(home)
    [entry] = [e for e in site_home_.registry.audit() if e.action == "accept_review"]
    assert entry.version == version.version and entry.site == "st-marys"
    assert entry.detail == {"mapping_sha256": unsure.digest(), "columns": {"Sex": {"feature": "sex", "confidence": 0.55}}}
