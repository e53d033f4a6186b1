"""A site in its own dialect (names, codes, units) loads, through its mapping.json, to the rows its canonical twin loads to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.data import load_federation, load_site
from fedmeta.data.federation import discover_sites
from fedmeta.data.mapping import ColumnMapping, Mapping
from fedmeta.evaluate.federations import folder_federation
from fedmeta.data.schema import Feature, Schema, SchemaError, TaskColumn
from fedmeta.fl.site_app import site_for
from fedmeta.fl.config import RunConfig
from fedmeta.fl.sites import prepare_federation

CHOL_MMOL = 38.67  # mg/dL per mmol/L of cholesterol
PAIN = ["typical", "atypical", "nonanginal", "asymptomatic"]


class _Context:
    def __init__(self, node_config):
        self.node_config = node_config


def heart_schema() -> Schema:
    return Schema(
        name="heart",
        features=[
            Feature(name="age"),
            Feature(name="sex", type="categorical", categories=["0", "1"]),
            Feature(name="chol"),
            Feature(name="cp", type="categorical", categories=PAIN),
        ],
        tasks=[TaskColumn(name="disease", kind="binary", label="target", classes=["0", "1"])],
    )


def canonical_rows(n: int = 16) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    target = rng.integers(0, 2, n).astype(float)
    target[3] = np.nan  # an unlabelled row stays unlabelled through the mapping
    return pd.DataFrame({
        "age": rng.integers(30, 80, n),
        "sex": rng.integers(0, 2, n),
        "chol": np.round(rng.uniform(150, 300, n), 1),
        "cp": [PAIN[i] for i in rng.integers(0, 4, n)],
        "target": target,
    })


def dialect_rows(canonical: pd.DataFrame) -> pd.DataFrame:
    """The same patients as another hospital exports them: its names, M/F, numeric pain codes, mmol/L, yes/no, an id column."""
    label = canonical["target"].map({1.0: "yes", 0.0: "no"})
    return pd.DataFrame({
        "patient_id": [f"p{i:03d}" for i in range(len(canonical))],
        "HeartDisease": label,
        "Cholesterol_mmol_L": canonical["chol"] / CHOL_MMOL,
        "Sex": canonical["sex"].map({1: "M", 0: "F"}),
        "ChestPainType": canonical["cp"].map({p: i + 1 for i, p in enumerate(PAIN)}),
        "AGE_YRS": canonical["age"],
    })


def dialect_mapping(schema: Schema, **changes: ColumnMapping) -> Mapping:
    columns = {
        "patient_id": ColumnMapping(feature=None),
        "HeartDisease": ColumnMapping(feature="target", values={"yes": "1", "no": "0"}),
        "Cholesterol_mmol_L": ColumnMapping(feature="chol", scale=CHOL_MMOL, evidence="unit mmol/L from the name"),
        "Sex": ColumnMapping(feature="sex", values={"M": "1", "F": "0"}),
        "ChestPainType": ColumnMapping(feature="cp", values={str(i + 1): p for i, p in enumerate(PAIN)}),
        "AGE_YRS": ColumnMapping(feature="age"),
    }
    columns.update(changes)
    return Mapping(schema_digest=schema.digest(), columns=columns)


def write_site(root: Path, site: str, rows: pd.DataFrame, mapping: Mapping | None = None, test: pd.DataFrame | None = None) -> Path:
    folder = root / site
    folder.mkdir(parents=True)
    rows.to_csv(folder / "train.csv", index=False, float_format="%.17g")
    if test is not None:
        test.to_csv(folder / "test.csv", index=False, float_format="%.17g")
    if mapping is not None:
        mapping.save(folder / "mapping.json")
    heart_schema().save(root / "schema.json")
    return folder


def assert_same_rows(a, b):
    # mmol/L * 38.67 is the mg/dL value up to float64 rounding; the encoded rows are float32.
    np.testing.assert_allclose(a.x, b.x, rtol=1e-6, atol=1e-6)
    assert a.labels.keys() == b.labels.keys()
    for task in a.labels:
        np.testing.assert_array_equal(a.labels[task], b.labels[task])
    np.testing.assert_array_equal(a.test_mask, b.test_mask)
    # In raw units too: standardizing with the site's own statistics would hide a missing unit conversion.
    for feature, sums in a.training_sums().items():
        np.testing.assert_allclose(b.training_sums()[feature], sums, rtol=1e-9, err_msg=feature)


@pytest.fixture
def twins(tmp_path) -> tuple[Path, Path]:
    """Two one-site federations holding the same patients: one in the schema's dialect, one in its own with a mapping.json."""
    rows = canonical_rows()
    write_site(tmp_path / "canonical", "st-marys", rows)
    write_site(tmp_path / "dialect", "st-marys", dialect_rows(rows), dialect_mapping(heart_schema()))
    return tmp_path / "canonical", tmp_path / "dialect"


def csv_config(folder: Path) -> RunConfig:
    return RunConfig.from_dict({"federation": {"kind": "csv", "data_dir": str(folder), "seed": 5}, "server": {"min_sites": 1}})


def test_a_folder_federation_picks_up_the_sites_mapping(twins):
    canonical, dialect = twins
    assert discover_sites(dialect)[0].mapping == dialect / "st-marys" / "mapping.json"
    assert discover_sites(canonical)[0].mapping is None
    [a], [b] = load_federation(canonical, seed=5), load_federation(dialect, seed=5)
    assert_same_rows(a, b)
    assert np.isnan(b.labels["disease"][3])


def test_a_site_file_takes_its_own_mapping_not_the_folders(tmp_path):
    rows, data = canonical_rows(), tmp_path / "data"
    data.mkdir()
    heart_schema().save(data / "schema.json")
    rows.to_csv(data / "north.csv", index=False)
    dialect_rows(rows).to_csv(data / "south.csv", index=False, float_format="%.17g")
    dialect_mapping(heart_schema()).save(data / "south.mapping.json")
    Mapping(columns={"age": ColumnMapping(feature=None)}).save(data / "mapping.json")  # a site folder's name: not read for site files
    north, south = load_federation(data)
    assert (north.name, south.name) == ("north", "south")
    np.testing.assert_allclose(north.x, south.x, rtol=1e-6, atol=1e-6)
    # fedmeta evaluate links the sites into a folder of its own: the site file's mapping goes with it
    linked = folder_federation(data, tmp_path / "evaluate", unseen=[])
    np.testing.assert_allclose(linked.seen[1].x, south.x)


def test_the_training_check_loads_the_dialect_site_to_its_twins_rows(twins):
    canonical, dialect = twins
    (_, [a]), (_, [b]) = prepare_federation(csv_config(canonical)), prepare_federation(csv_config(dialect))
    assert_same_rows(a, b)


def test_the_mapping_applies_to_the_test_file_too_labels_included(tmp_path):
    rows, test = canonical_rows(), canonical_rows(8)
    write_site(tmp_path / "canonical", "st-marys", rows, test=test)
    write_site(tmp_path / "dialect", "st-marys", dialect_rows(rows), dialect_mapping(heart_schema()), test=dialect_rows(test))
    [a], [b] = load_federation(tmp_path / "canonical"), load_federation(tmp_path / "dialect")
    assert b.test_mask.sum() == 8
    assert_same_rows(a, b)


def test_a_supernode_takes_mapping_path_from_its_node_config(twins):
    canonical, dialect = twins
    config = csv_config(canonical)
    node = {"data-path": str(dialect / "st-marys" / "train.csv"), "schema-path": str(dialect / "schema.json"), "site-name": "st-marys"}
    a = load_site(canonical / "st-marys" / "train.csv", heart_schema(), seed=5)
    b = site_for(_Context({**node, "mapping-path": str(dialect / "st-marys" / "mapping.json")}), config)
    assert_same_rows(a, b)
    with pytest.raises(SchemaError, match="has no column 'target'"):
        site_for(_Context(node), config)  # without its mapping the site's own names do not fit


def test_a_supernode_refuses_a_mapping_under_review_unless_its_node_config_accepts(tmp_path):
    rows = canonical_rows()
    unsure = dialect_mapping(heart_schema(), Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, confidence=0.55, review=True))
    folder = write_site(tmp_path, "st-marys", dialect_rows(rows), unsure)
    node = {"data-path": str(folder / "train.csv"), "schema-path": str(tmp_path / "schema.json"), "mapping-path": str(folder / "mapping.json")}
    with pytest.raises(SchemaError, match=r"mapping.json: 1 column\(s\) flagged for review \('Sex'\)"):
        site_for(_Context(node), csv_config(tmp_path))
    assert site_for(_Context({**node, "accept-review": True}), csv_config(tmp_path)).n_rows == len(rows)


def test_training_refuses_a_site_whose_mapping_is_under_review(tmp_path):
    unsure = dialect_mapping(heart_schema(), Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, confidence=0.55, review=True))
    write_site(tmp_path, "st-marys", dialect_rows(canonical_rows()), unsure)
    with pytest.raises(SchemaError) as e:
        prepare_federation(csv_config(tmp_path))
    [line] = e.value.lines
    assert line.startswith(f"{tmp_path / 'st-marys' / 'mapping.json'}: site 'st-marys' has 1 column(s) flagged for review: column 'Sex' -> 'sex'")
    assert line.endswith("or pass --accept-review")
    _, [site] = prepare_federation(csv_config(tmp_path), accept_review=True)
    assert site.name == "st-marys"


def test_an_unmapped_feature_stops_training_in_one_line_naming_the_site_and_feature(tmp_path):
    write_site(tmp_path, "st-marys", dialect_rows(canonical_rows()), dialect_mapping(heart_schema(), Cholesterol_mmol_L=ColumnMapping(feature=None)))
    with pytest.raises(SchemaError) as e:
        prepare_federation(csv_config(tmp_path))
    assert e.value.lines == [f"{tmp_path / 'st-marys' / 'train.csv'}: missing feature column(s) ['chol']"]


def test_a_mapping_that_does_not_fit_the_rows_names_every_problem_before_training(tmp_path):
    mapping = dialect_mapping(heart_schema(), Sex=ColumnMapping(feature="sex", values={"M": "1"}), ChestPainType=ColumnMapping(feature="cp", values={"1": "typical"}))
    write_site(tmp_path, "st-marys", dialect_rows(canonical_rows()), mapping)
    with pytest.raises(SchemaError) as e:
        prepare_federation(csv_config(tmp_path))
    source = tmp_path / "st-marys" / "train.csv"
    assert [line.split(":")[0:2] for line in e.value.lines] == [[str(source), " column 'Sex' (feature 'sex')"], [str(source), " column 'ChestPainType' (feature 'cp')"]]


def test_fedmeta_train_refuses_review_in_one_line_naming_the_mapping(tmp_path):
    unsure = dialect_mapping(heart_schema(), Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, review=True))
    write_site(tmp_path / "fed", "st-marys", dialect_rows(canonical_rows()), unsure)
    config = tmp_path / "run.toml"
    config.write_text(f'name = "x"\nrounds = 1\n[federation]\nkind = "csv"\ndata_dir = "{tmp_path / "fed"}"\n[server]\nmin_sites = 1\n')
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "mapping.json: site 'st-marys' has 1 column(s) flagged for review" in errors[0] and "--accept-review" in errors[0]
    assert "Traceback" not in result.output
