"""fedmeta personalize reads a site's rows through its mapping.json and records it; fedmeta predict applies the recorded mapping."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.data import load_federation
from fedmeta.data.mapping import ColumnMapping, Mapping
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir
from fedmeta.registry import SiteHome
from test_mapping_sites import canonical_rows, dialect_mapping, dialect_rows, heart_schema, write_site

FAST = ["--mode", "all", "--shots", "4", "--steps", "5", "--no-alone", "--seed", "0"]
runner = CliRunner()


@pytest.fixture(scope="module")
def heart(tmp_path_factory) -> Path:
    """st-marys twice (the schema's dialect, and its own beside a mapping.json, each with a test file) and a round-0 base."""
    root = tmp_path_factory.mktemp("heart")
    rows, test = canonical_rows(40), canonical_rows(12)
    write_site(root / "canonical", "st-marys", rows, test=test)
    write_site(root / "dialect", "st-marys", dialect_rows(rows), dialect_mapping(heart_schema()), test=dialect_rows(test))
    config = RunConfig.from_dict({"name": "base", "model": {"hidden": [8]}, "federation": {"kind": "csv", "data_dir": str(root / "canonical")}})
    run = RunDir(root / "run")
    run.create(config)
    run.save_base_model(initial_state(config), config, round_=1, statistics=load_federation(root / "canonical")[0].schema.statistics())
    return root


def personalize(heart: Path, dialect: str, home: Path, *extra: str):
    site = heart / dialect / "st-marys"
    return runner.invoke(app, ["personalize", "--data", str(site / "train.csv"), "--test", str(site / "test.csv"), "--schema",
                               str(heart / dialect / "schema.json"), "--base", str(heart / "run"), "--site-home", str(home), *FAST, *extra])


@pytest.fixture(scope="module")
def homes(heart, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for dialect in ("canonical", "dialect"):
        out[dialect] = tmp_path_factory.mktemp(f"home-{dialect}")
        result = personalize(heart, dialect, out[dialect])
        assert result.exit_code == 0, result.output
    return out


def test_personalize_picks_up_the_mapping_beside_data_and_scores_as_the_canonical_twin(homes):
    canonical, dialect = (SiteHome(homes[d]) for d in ("canonical", "dialect"))
    a, b = canonical.current("st-marys"), dialect.current("st-marys")
    # Both the training and the test file (labels included) went through the mapping: the held-out scores agree.
    assert b.metrics.keys() == a.metrics.keys()
    for key, value in a.metrics.items():
        assert b.metrics[key] == pytest.approx(value, abs=1e-4), key


def test_the_personalized_model_records_the_mapping(homes, heart):
    home = SiteHome(homes["dialect"])
    version = home.current("st-marys")
    manifest, _ = home.load(version)
    recorded = Mapping.load(heart / "dialect" / "st-marys" / "mapping.json")
    assert Mapping.model_validate(manifest.mapping) == recorded
    assert version.lineage["data"]["mapping_sha256"] == recorded.digest()
    canonical = SiteHome(homes["canonical"])
    assert canonical.load(canonical.current("st-marys"))[0].mapping is None


def predictions(home: Path, data: Path) -> pd.DataFrame:
    result = runner.invoke(app, ["predict", "--data", str(data), "--site-home", str(home)])
    assert result.exit_code == 0, result.output
    return pd.read_csv(io.StringIO(result.stdout))


def test_predict_gives_the_same_predictions_for_the_dialect_file_as_for_the_canonical_file(homes, heart):
    dialect = predictions(homes["dialect"], heart / "dialect" / "st-marys" / "test.csv")
    canonical = predictions(homes["dialect"], heart / "canonical" / "st-marys" / "test.csv")
    assert len(dialect) == 12
    pd.testing.assert_frame_equal(dialect, canonical, rtol=1e-5)


def test_predict_names_a_site_value_the_recorded_mapping_lacks_without_showing_it(homes, heart, tmp_path):
    rows = pd.read_csv(heart / "dialect" / "st-marys" / "test.csv")
    rows.loc[0, "Sex"] = "X"
    rows.to_csv(tmp_path / "rows.csv", index=False)
    result = runner.invoke(app, ["predict", "--data", str(tmp_path / "rows.csv"), "--site-home", str(homes["dialect"])])
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert f"{tmp_path / 'rows.csv'}: column 'Sex' (feature 'sex'): 1 site value(s) have no schema value" in line.replace("\n", "")
    assert "'X'" not in result.output


def test_a_mapping_under_review_is_refused_and_accept_review_is_audited(heart, tmp_path):
    unsure = dialect_mapping(heart_schema(), ChestPainType=ColumnMapping(feature="cp", values={"1": "typical", "2": "atypical", "3": "nonanginal",
                                                                                               "4": "asymptomatic"}, confidence=0.6, review=True))
    unsure.save(tmp_path / "unsure.json")
    refused = personalize(heart, "dialect", tmp_path / "home", "--mapping", str(tmp_path / "unsure.json"))
    assert refused.exit_code == 2
    [line] = [line for line in refused.output.splitlines() if line.startswith("error")]
    assert f"{tmp_path / 'unsure.json'}: 1 column(s) flagged for review ('ChestPainType')" in line
    assert not (tmp_path / "home" / "models").exists()

    accepted = personalize(heart, "dialect", tmp_path / "home", "--mapping", str(tmp_path / "unsure.json"), "--accept-review")
    assert accepted.exit_code == 0, accepted.output
    home = SiteHome(tmp_path / "home")
    version = home.current("st-marys")
    [entry] = [e for e in home.registry.audit() if e.action == "accept_review"]
    assert entry.version == version.version and entry.site == "st-marys"
    assert entry.detail == {"mapping_sha256": unsure.digest(), "columns": {"ChestPainType": {"feature": "cp", "confidence": 0.6}}}
    assert home.registry.verify().problems == []
