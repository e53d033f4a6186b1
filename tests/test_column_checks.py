"""Files without a column they need, named before round 1 one line per file, and near misses between column names."""

import numpy as np
import pandas as pd
import pytest

from fedmeta.data import Feature, Schema, TaskColumn, load_site
from fedmeta.data.near_miss import near_miss
from fedmeta.data.schema import SchemaProblems
from fedmeta.fl.config import RunConfig
from fedmeta.fl.sites import prepare_federation

SCHEMA = Schema(name="clinics", features=[Feature(name="mean radius"), Feature(name="age")],
                tasks=[TaskColumn(name="cancer", kind="binary", label="diagnosis", classes=["0", "1"])])


def _clinics(root, renamed=None, drop=None):
    """Three site folders (train.csv, test.csv) fitting SCHEMA, and the schema; ``renamed``/``drop`` keyed by (site, part)."""
    for site in ("adults", "childrens", "north"):
        (root / site).mkdir(parents=True)
        for part in ("train", "test"):
            rows = pd.DataFrame({"mean radius": np.linspace(10, 20, 8), "age": np.arange(8) + 40, "diagnosis": np.arange(8) % 2})
            rows = rows.rename(columns=(renamed or {}).get((site, part), {})).drop(columns=(drop or {}).get((site, part), []))
            rows.to_csv(root / site / f"{part}.csv", index=False)
    SCHEMA.save(root / "schema.json")
    return root


def _prepare(root):
    return prepare_federation(RunConfig.from_dict({"rounds": 1, "federation": {"kind": "csv", "data_dir": str(root)}}))


def test_before_round_1_every_file_without_its_sites_label_column_is_named(tmp_path):
    clinics = _clinics(tmp_path, drop={("childrens", "test"): ["diagnosis"], ("north", "test"): ["diagnosis"]})
    with pytest.raises(SchemaProblems) as refused:
        _prepare(clinics)
    assert refused.value.lines == [
        f"{clinics}/childrens/test.csv has no column 'diagnosis' (label of task 'cancer')",
        f"{clinics}/north/test.csv has no column 'diagnosis' (label of task 'cancer')",
    ]


def test_before_round_1_a_missing_feature_names_the_file_and_its_near_miss(tmp_path):
    clinics = _clinics(tmp_path, renamed={("childrens", "train"): {"mean radius": "mean_radius"}}, drop={("north", "test"): ["age"]})
    with pytest.raises(SchemaProblems) as refused:
        _prepare(clinics)
    assert refused.value.lines == [
        f"{clinics}/childrens/train.csv: missing feature column(s) ['mean radius']; did you mean 'mean_radius'?",
        f"{clinics}/north/test.csv: missing feature column(s) ['age']",
    ]


def test_a_site_loaded_alone_refuses_a_test_file_without_the_label_column(tmp_path):
    clinics = _clinics(tmp_path, drop={("north", "test"): ["diagnosis"]})
    with pytest.raises(SchemaProblems, match=r"north/test.csv has no column 'diagnosis' \(label of task 'cancer'\)$"):
        load_site(clinics / "north" / "train.csv", SCHEMA, test_path=clinics / "north" / "test.csv")


@pytest.mark.parametrize(
    "name, known, meant",
    [
        ("mean_radius", ["mean radius", "mean texture"], "mean radius"),
        ("Mean-Radius", ["mean radius"], "mean radius"),
        ("meanRadius", ["mean radius"], "mean radius"),
        ("creatinin", ["creatinine", "age"], "creatinine"),
        ("bp_sys", ["bp_dia"], None),
        ("lab_1", ["lab_10", "lab_2"], None),
        ("mean radius", ["worst radius"], None),
        ("weight", ["height"], None),
    ],
)
def test_a_near_miss_is_the_same_column_spelled_differently_never_another_column(name, known, meant):
    assert near_miss(name, known) == meant
