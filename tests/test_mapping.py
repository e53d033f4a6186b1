"""mapping.json: loading, checking a site's rows against it, and applying it (fedmeta/data/mapping.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedmeta.data.mapping import ColumnMapping, Mapping, MappingError, apply, check, pending_review, require_reviewed, status
from fedmeta.data.schema import Feature, Schema, TaskColumn

SOURCE = "st-marys/train.csv"


def schema() -> Schema:
    return Schema(
        name="heart",
        features=[Feature(name="age"), Feature(name="sex", type="categorical", categories=["0", "1"]), Feature(name="chol")],
        tasks=[TaskColumn(name="disease", kind="binary", label="target", classes=["0", "1"])],
    )


def dialect_frame() -> pd.DataFrame:
    return pd.DataFrame({"Age": [61, 45], "Sex": ["M", "F"], "CHOL_MMOL": [5.2, 6.1], "HeartDisease": ["yes", "no"], "ward": ["a", "b"]})


def dialect_mapping() -> Mapping:
    return Mapping(
        schema_digest=schema().digest(),
        columns={
            "Age": ColumnMapping(feature="age"),
            "Sex": ColumnMapping(feature="sex", values={"M": "1", "F": "0"}),
            "CHOL_MMOL": ColumnMapping(feature="chol", scale=38.67),
            "HeartDisease": ColumnMapping(feature="target", values={"yes": "1", "no": "0"}),
            "ward": ColumnMapping(feature=None),
        },
    )


# --- the file ----------------------------------------------------------------


def test_save_then_load_gives_the_same_mapping_and_digest(tmp_path):
    m = dialect_mapping()
    m.save(tmp_path / "mapping.json")
    back = Mapping.load(tmp_path / "mapping.json")
    assert back == m and back.digest() == m.digest()


def test_the_digest_does_not_depend_on_key_order(tmp_path):
    content = dialect_mapping().model_dump(mode="json")
    reordered = {"columns": {c: dict(reversed(list(r.items()))) for c, r in reversed(list(content["columns"].items()))}, "schema_digest": content["schema_digest"]}
    (tmp_path / "m.json").write_text(json.dumps(reordered))
    assert Mapping.load(tmp_path / "m.json").digest() == dialect_mapping().digest()


def test_the_digest_changes_with_a_conversion():
    m = dialect_mapping()
    other = m.model_copy(deep=True)
    other.columns["CHOL_MMOL"].scale = 38.66
    assert other.digest() != m.digest()


@pytest.mark.parametrize(
    "columns, field",
    [
        ({"Sex": {"feature": "sex", "confidence": 1.5}}, "columns.Sex.confidence"),
        ({"Sex": {"feature": "sex", "scale": 0}}, "columns.Sex.scale"),
        ({"Sex": {"feature": "sex", "unit": "mg/dL"}}, "columns.Sex.unit"),
        ({"Sex": {"scale": 2.0}}, "columns.Sex.feature"),
    ],
)
def test_a_bad_field_is_named_with_the_file_in_one_line(tmp_path, columns, field):
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps({"schema_digest": "x", "columns": columns}))
    with pytest.raises(MappingError) as e:
        Mapping.load(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and field in message


def test_a_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "mapping.json"
    path.write_text('{"columns": {')
    with pytest.raises(MappingError, match=f"invalid mapping {path}: .*not valid JSON") as e:
        Mapping.load(path)
    assert "\n" not in str(e.value)


def test_schema_digest_ignores_key_order_and_statistics_but_not_content():
    s = schema()
    shuffled = Schema.model_validate(json.loads(json.dumps(dict(reversed(list(s.model_dump(mode="json").items()))))))
    assert shuffled.digest() == s.digest()
    assert s.with_statistics({"age": (50.0, 9.0)}).digest() == s.digest()
    renamed = s.model_copy(update={"features": [Feature(name="age_years"), *s.features[1:]]})
    assert renamed.digest() != s.digest()


# --- apply ---------------------------------------------------------------------


def test_apply_renames_recodes_converts_and_drops():
    out = apply(dialect_mapping(), dialect_frame())
    assert list(out.columns) == ["age", "sex", "chol", "target"]
    assert out["sex"].tolist() == ["1", "0"] and out["target"].tolist() == ["1", "0"]
    np.testing.assert_allclose(out["chol"], [5.2 * 38.67, 6.1 * 38.67])
    assert out["age"].tolist() == [61, 45]


def test_apply_keeps_unmapped_columns_and_empty_labels():
    frame = pd.DataFrame({"age": [1, 2], "HeartDisease": ["yes", None]})
    out = apply(Mapping(columns={"HeartDisease": ColumnMapping(feature="target", values={"yes": "1"})}), frame)
    assert out["age"].tolist() == [1, 2]
    assert out["target"].iloc[0] == "1" and pd.isna(out["target"].iloc[1])


def test_apply_converts_with_the_offset():
    frame = pd.DataFrame({"temp_f": [98.6, 212.0]})
    out = apply(Mapping(columns={"temp_f": ColumnMapping(feature="temp", scale=5 / 9, offset=-32 * 5 / 9)}), frame)
    np.testing.assert_allclose(out["temp"], [37.0, 100.0])


def test_apply_matches_codes_read_as_floats():
    # A CSV column of codes with an empty cell is read as floats: 1.0 must find the key "1".
    out = apply(Mapping(columns={"cp": ColumnMapping(feature="chest_pain", values={"1": "typical"})}), pd.DataFrame({"cp": [1.0, np.nan]}))
    assert out["chest_pain"].iloc[0] == "typical" and pd.isna(out["chest_pain"].iloc[1])


@pytest.mark.parametrize("yes, no", [("true", "false"), ("True", "False"), ("TRUE", "FALSE")])
def test_apply_and_check_match_cells_a_csv_reads_as_booleans(tmp_path, yes, no):
    # pandas reads true/True/TRUE cells as booleans (and, with an empty cell, as objects): the file's spelling must still find its key.
    (tmp_path / "site.csv").write_text("Age,Sex,CHOL_MMOL,HeartDisease\n61,M,5.2,TRUE\n45,F,6.1,false\n50,M,5.0,\n")
    frame = pd.read_csv(tmp_path / "site.csv")
    mapping = dialect_mapping().model_copy(update={"columns": {**dialect_mapping().columns, "HeartDisease": ColumnMapping(
        feature="target", values={yes: "1", no: "0"})}})
    assert check(mapping, frame, schema(), SOURCE) == []
    assert apply(mapping, frame)["target"].tolist()[:2] == ["1", "0"]



# --- check ---------------------------------------------------------------------


def test_a_fitting_mapping_has_no_problems():
    assert check(dialect_mapping(), dialect_frame(), schema(), SOURCE) == []


def test_a_site_already_in_the_schemas_dialect_needs_no_entries():
    frame = pd.DataFrame({"age": [61], "sex": [1], "chol": [200.0], "target": [1]})
    assert check(Mapping(), frame, schema(), SOURCE) == []


def _with(**changes) -> Mapping:
    m = dialect_mapping()
    for column, rule in changes.items():
        m.columns[column] = rule
    return m


# Each problem: the mapping or rows that cause it, and the names its one line must carry.
PROBLEMS = {
    "unknown target": (_with(ward=ColumnMapping(feature="ward_name")), dialect_frame(), ["'ward'", "'ward_name'"]),
    "two columns, one feature": (_with(ward=ColumnMapping(feature="age")), dialect_frame(), ["'Age'", "'ward'", "feature 'age'"]),
    "passthrough collides": (dialect_mapping(), dialect_frame().assign(age=[1, 2]), ["'Age'", "'age'", "feature 'age'"]),
    "feature unmapped": (_with(CHOL_MMOL=ColumnMapping(feature=None)), dialect_frame(), ["feature 'chol'"]),
    "mapped column absent": (dialect_mapping(), dialect_frame().drop(columns="CHOL_MMOL"), ["'CHOL_MMOL'", "feature 'chol'"]),
    "no label": (_with(HeartDisease=ColumnMapping(feature=None)), dialect_frame(), ["'target'", "task 'disease'"]),
    "site value without schema value": (
        _with(Sex=ColumnMapping(feature="sex", values={"M": "1"})),
        dialect_frame(),
        ["'Sex'", "feature 'sex'", "1 site value(s)"],
    ),
    "values to a non-category": (_with(Sex=ColumnMapping(feature="sex", values={"M": "male", "F": "0"})), dialect_frame(), ["'Sex'", "feature 'sex'", "'male'"]),
    "label value without class": (
        _with(HeartDisease=ColumnMapping(feature="target", values={"yes": "1"})),
        dialect_frame(),
        ["'HeartDisease'", "task 'disease'", "1 site value(s)"],
    ),
    "numeric does not parse": (dialect_mapping(), dialect_frame().assign(CHOL_MMOL=["5.2", "high"]), ["'CHOL_MMOL'", "feature 'chol'", "1 value(s) are not numbers"]),
    "scale on a categorical": (_with(Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, scale=2.0)), dialect_frame(), ["'Sex'", "feature 'sex'", "categorical"]),
    "schema digest differs": (dialect_mapping().model_copy(update={"schema_digest": "0" * 64}), dialect_frame(), ["000000000000", schema().digest()[:12]]),
}


@pytest.mark.parametrize("case", sorted(PROBLEMS))
def test_each_problem_is_one_line_naming_file_column_and_feature(case):
    mapping, frame, names = PROBLEMS[case]
    lines = check(mapping, frame, schema(), SOURCE)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line and line.startswith(f"{SOURCE}: ")
    for name in names:
        assert name in line, (name, line)
    # never a cell's value
    for value in ("'M'", "'F'", "'yes'", "'no'", "'high'", "5.2"):
        assert value not in line, (value, line)


def test_a_test_file_for_prediction_needs_no_label():
    frame = dialect_frame().drop(columns="HeartDisease")
    assert check(dialect_mapping(), frame, schema(), SOURCE, need_labels=False) == []
    assert len(check(dialect_mapping(), frame, schema(), SOURCE)) == 1


# --- review --------------------------------------------------------------------


def test_pending_review_lists_the_flagged_columns_only():
    m = _with(Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, confidence=0.6, review=True, evidence="name 'Sex' ~ 'sex'"))
    assert pending_review(m) == ["column 'Sex' -> 'sex' (confidence 0.60): name 'Sex' ~ 'sex'"]
    assert pending_review(dialect_mapping()) == []


def test_a_mapping_under_review_is_refused_unless_accepted():
    m = _with(Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, review=True))
    with pytest.raises(MappingError, match=r"st-marys/mapping.json: 1 column\(s\) flagged for review \('Sex'\).*--accept-review"):
        require_reviewed(m, "st-marys/mapping.json")
    assert len(require_reviewed(m, "st-marys/mapping.json", accept_review=True)) == 1
    assert require_reviewed(dialect_mapping(), "st-marys/mapping.json") == []


def test_status_counts_without_naming_columns():
    m = _with(Sex=ColumnMapping(feature="sex", values={"M": "1", "F": "0"}, review=True))
    assert status(m) == {"digest": m.digest(), "mapped": 4, "converted": 1, "recoded": 2, "review": 1}
    assert status(None) == {"digest": None, "mapped": 0, "converted": 0, "recoded": 0, "review": 0}
