"""The schema's matching hints: version, descriptions, synonyms, units and category spellings (issue 26)."""

from __future__ import annotations

import json

import pytest

from fedmeta.data.schema import Feature, Schema, SchemaError, TaskColumn

OLD = {
    "name": "heart",
    "features": [
        {"name": "chol", "type": "numeric", "categories": None, "mean": 240.0, "std": 50.0},
        {"name": "sex", "type": "categorical", "categories": ["F", "M"], "mean": None, "std": None},
    ],
    "tasks": [{"name": "disease", "kind": "binary", "n_classes": 2, "label": "target", "classes": ["0", "1"], "target_mean": 0.0, "target_std": 1.0}],
}


def test_a_schema_written_before_hints_loads_and_is_written_back_with_only_a_version(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(OLD))
    schema = Schema.load(path)
    assert schema.version == "1"
    schema.save(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again.pop("version") == "1"
    assert again == OLD


def test_hints_survive_a_round_trip(tmp_path):
    schema = Schema(
        name="heart", version="2024-06",
        features=[
            Feature(name="chol", unit="mg/dL", synonyms=["cholesterol"], description="serum cholesterol"),
            Feature(name="sex", type="categorical", categories=["F", "M"], category_synonyms={"F": ["female", "w"], "M": ["male"]}),
        ],
        tasks=[TaskColumn(name="disease", kind="binary", label="target", synonyms=["heart_disease"])],
    )
    schema.save(tmp_path / "schema.json")
    assert Schema.load(tmp_path / "schema.json") == schema


def test_category_synonyms_must_name_the_features_categories(tmp_path):
    bad = json.loads(json.dumps(OLD))
    bad["features"][1]["category_synonyms"] = {"X": ["other"]}
    (tmp_path / "schema.json").write_text(json.dumps(bad))
    with pytest.raises(SchemaError, match=r"feature 'sex': category_synonyms names \['X'\]"):
        Schema.load(tmp_path / "schema.json")


def test_a_categorical_feature_takes_no_unit():
    with pytest.raises(ValueError, match="feature 'sex': categorical features take no 'unit'"):
        Feature(name="sex", type="categorical", categories=["F", "M"], unit="kg")
