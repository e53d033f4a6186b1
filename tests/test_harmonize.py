"""Schema matching at a site (issue 26): four dialects of one heart-disease table, units, categories, and never a confident guess."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.data.harmonize.categories import map_categories
from fedmeta.data.harmonize.match import match_frame
from fedmeta.data.harmonize.units import conversion, decide_unit, unit_in_name
from fedmeta.data.harmonize.vocabulary import tokens
from fedmeta.data.mapping import apply
from fedmeta.data.schema import Feature, Schema, TaskColumn

CP = ["typical", "atypical", "non-anginal", "asymptomatic"]
CODES = {k: i + 1 for i, k in enumerate(CP)}


def heart_schema(code_book: bool = False) -> Schema:
    """The federation's schema, with published statistics and units (what a coordinator publishes after a first run)."""
    cp_book = {c: [str(CODES[c])] for c in CP} if code_book else None
    sex_book = {"F": ["0"], "M": ["1"]} if code_book else None
    return Schema(
        name="heart",
        features=[
            Feature(name="age", unit="a", mean=54.0, std=9.0),
            Feature(name="sex", type="categorical", categories=["F", "M"], category_synonyms=sex_book),
            Feature(name="chest_pain", type="categorical", categories=CP, category_synonyms=cp_book),
            Feature(name="resting_bp", unit="mmHg", synonyms=["resting blood pressure"], mean=131.0, std=17.5),
            Feature(name="cholesterol", unit="mg/dL", mean=246.0, std=51.0),
            Feature(name="max_heart_rate", mean=150.0, std=23.0),
        ],
        tasks=[TaskColumn(name="heart_disease", kind="binary", label="heart_disease", classes=["0", "1"])],
    )


def canonical(n: int = 200, seed: int = 0) -> pd.DataFrame:
    r = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": r.normal(54, 9, n).round(), "sex": r.choice(["F", "M"], n), "chest_pain": r.choice(CP, n),
        "resting_bp": r.normal(131, 17.5, n).round(), "cholesterol": r.normal(246, 51, n).round(),
        "max_heart_rate": r.normal(150, 23, n).round(), "heart_disease": r.integers(0, 2, n),
    })


def dialect(name: str, c: pd.DataFrame) -> pd.DataFrame:
    """The issue's four exports of the same rows."""
    if name == "uci":
        return pd.DataFrame({"age": c.age, "sex": (c.sex == "M").astype(int), "cp": c.chest_pain.map(CODES), "trestbps": c.resting_bp,
                             "chol": c.cholesterol, "thalach": c.max_heart_rate, "target": c.heart_disease})
    if name == "kaggle":
        return pd.DataFrame({"Age": c.age, "Sex": c.sex, "ChestPainType": c.chest_pain.map(dict(zip(CP, ["TA", "ATA", "NAP", "ASY"]))),
                             "RestingBP": c.resting_bp, "Cholesterol": c.cholesterol, "MaxHR": c.max_heart_rate, "HeartDisease": c.heart_disease})
    if name == "si":
        return pd.DataFrame({
            "age_years": c.age, "sex": c.sex.map({"F": "female", "M": "male"}),
            "chest_pain_type": c.chest_pain.map(dict(zip(CP, ["typical angina", "atypical angina", "non-anginal pain", "asymptomatic"]))),
            "bp_systolic_rest_kpa": (c.resting_bp / 7.50062).round(3), "cholesterol_mmol_l": (c.cholesterol / 38.67).round(3),
            "max_heart_rate": c.max_heart_rate, "heart_disease": c.heart_disease.map({0: "no", 1: "yes"}),
        })
    return pd.DataFrame({"PAT_AGE_MO": c.age * 12, "SEX_CD": c.sex, "SBP_REST": c.resting_bp, "CHOL_TOTAL": c.cholesterol,
                         "CP_CODE": c.chest_pain.map(CODES), "HR_MAX": c.max_heart_rate, "DX_HEART": c.heart_disease.map({0: "N", 1: "Y"})})


def assert_same_rows(mapped: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert sorted(mapped.columns) == sorted(expected.columns)
    for column in expected.columns:
        if not pd.api.types.is_numeric_dtype(expected[column]):
            assert (mapped[column].astype(str) == expected[column]).all(), column
        else:
            np.testing.assert_allclose(pd.to_numeric(mapped[column]).to_numpy(float), expected[column].to_numpy(float), atol=0.1, err_msg=column)


@pytest.mark.parametrize("name", ["uci", "kaggle", "si", "warehouse"])
def test_each_dialect_maps_back_to_the_canonical_rows(name):
    rows = canonical()
    result = match_frame(heart_schema(code_book=True), dialect(name, rows))
    assert result.unmapped == []
    assert [d.column for d in result.decisions if d.review] == []
    assert_same_rows(apply(result.mapping, dialect(name, rows)), rows)


def test_numeric_codes_without_a_published_code_book_are_flagged_for_review():
    result = match_frame(heart_schema(code_book=False), dialect("uci", canonical()))
    flagged = {d.column: d.target for d in result.decisions if d.review}
    assert flagged == {"sex": "sex", "cp": "chest_pain"}
    assert all(d.confidence < 0.75 for d in result.decisions if d.review)


def test_a_decoy_with_the_right_values_but_another_name_is_never_confident():
    rows = canonical()
    site = dialect("kaggle", rows).drop(columns=["Cholesterol"]).assign(Triglycerides=rows.cholesterol.to_numpy())
    result = match_frame(heart_schema(), site)
    decoy = next(d for d in result.decisions if d.column == "Triglycerides")
    assert decoy.review
    assert not any(d.target == "cholesterol" and not d.review for d in result.decisions)


def test_a_related_column_with_values_in_another_unit_is_not_taken_for_the_feature():
    rows = canonical()
    site = dialect("kaggle", rows).drop(columns=["Cholesterol"]).assign(chol_ratio=(rows.cholesterol / 50).round(1))  # x 38.67 looks like mg/dL
    assert not any(d.target == "cholesterol" and not d.review for d in match_frame(heart_schema(), site).decisions)


def test_a_column_that_matches_nothing_well_is_flagged_while_a_feature_has_no_column():
    site = dialect("kaggle", canonical()).drop(columns=["MaxHR"]).assign(Oldpeak=np.random.default_rng(2).uniform(0, 4, 200).round(1))
    result = match_frame(heart_schema(), site)
    decision = next(d for d in result.decisions if d.column == "Oldpeak")
    assert (decision.target, decision.review) == (None, True) and "max_heart_rate" in decision.evidence
    assert result.unmapped == ["max_heart_rate"]


def test_an_empty_label_column_is_a_task_the_site_does_not_record_and_maps_by_its_name():
    site = dialect("kaggle", canonical()).assign(HeartDisease=np.nan)
    decision = next(d for d in match_frame(heart_schema(), site).decisions if d.column == "HeartDisease")
    assert (decision.target, decision.review) == ("heart_disease", False)


def test_a_column_that_nothing_needs_is_ignored_without_review():
    site = dialect("kaggle", canonical()).assign(patient_id=np.arange(200) + 10_000)
    decision = next(d for d in match_frame(heart_schema(), site).decisions if d.column == "patient_id")
    assert (decision.target, decision.review) == (None, False)


def test_a_unit_is_found_from_the_values_when_the_name_does_not_say():
    rows = canonical()
    site = dialect("kaggle", rows).assign(Cholesterol=(rows.cholesterol / 38.67).round(3))
    decision = next(d for d in match_frame(heart_schema(), site).decisions if d.column == "Cholesterol")
    assert (decision.target, decision.scale, decision.review) == ("cholesterol", 38.67, False)


def test_a_name_whose_unit_the_values_contradict_is_flagged():
    values = np.random.default_rng(1).normal(246, 51, 200)  # mg/dL values under a name saying mmol/L
    decision = decide_unit("mg/dL", "cholesterol", tokens("chol_mmol_l"), values, (246.0, 51.0))
    assert decision.confidence < 0.75 and decision.scale == 1.0


@pytest.mark.parametrize("site_unit, schema_unit, analyte, value, expected", [
    ("mmol/L", "mg/dL", "cholesterol", 5.0, 193.35),
    ("mmol/L", "mg/dL", "glucose", 5.5, 99.088),
    ("umol/L", "mg/dL", "creatinine", 88.4, 1.0),
    ("kPa", "mmHg", None, 16.0, 120.00992),
    ("[lb_av]", "kg", None, 154.324, 70.0),
    ("[degF]", "Cel", None, 98.6, 37.0),
    ("Cel", "[degF]", None, 37.0, 98.6),
    ("mo", "a", None, 30.0, 2.5),
])
def test_conversions_take_a_site_value_to_the_schema_unit(site_unit, schema_unit, analyte, value, expected):
    scale, offset = conversion(site_unit, schema_unit, analyte)
    assert value * scale + offset == pytest.approx(expected, rel=1e-4)


def test_a_mass_to_molar_conversion_needs_a_known_analyte():
    assert conversion("mmol/L", "mg/dL", None) is None
    assert conversion("/min", "mmHg") is None and conversion("kg", "mmHg") is None


@pytest.mark.parametrize("name, unit", [("bp_systolic_rest_kpa", "kPa"), ("cholesterol_mmol_l", "mmol/L"), ("CreatUmolL", "umol/L"),
                                        ("weight_lbs", "[lb_av]"), ("PAT_AGE_MO", "mo"), ("temp_f", "[degF]"), ("RestingBP", None)])
def test_the_unit_a_name_states(name, unit):
    assert unit_in_name(tokens(name)) == unit


def test_category_spellings_in_other_languages_map_to_schema_values():
    m = map_categories(["männlich", "weiblich", "hombre", "mujer"], ["F", "M"])
    assert m.values == {"männlich": "M", "weiblich": "F", "hombre": "M", "mujer": "F"} and m.confident


def test_an_unknown_category_spelling_is_left_for_a_person():
    m = map_categories(["M", "F", "X"], ["F", "M"])
    assert "X" not in m.values and not m.confident


def test_cli_takes_the_base_models_statistics_as_value_evidence(tmp_path):
    from fedmeta.fl.config import RunConfig
    from fedmeta.fl.run_dir import RunDir

    published = heart_schema()
    bare = published.model_copy(update={"features": [f.model_copy(update={"mean": None, "std": None}) for f in published.features]})
    bare.save(tmp_path / "schema.json")
    RunDir(tmp_path / "run").save_base_model({}, RunConfig(), 1, statistics=published.statistics())
    rows = canonical()
    dialect("kaggle", rows).assign(Cholesterol=(rows.cholesterol / 38.67).round(3)).to_csv(tmp_path / "site.csv", index=False)
    args = ["schema", "match", str(tmp_path / "site.csv"), "--schema", str(tmp_path / "schema.json"), "--out", str(tmp_path / "m.json")]
    assert CliRunner().invoke(app, args + ["--base", str(tmp_path / "run")]).exit_code == 0
    assert json.loads((tmp_path / "m.json").read_text())["columns"]["Cholesterol"]["scale"] == 38.67


def test_cli_writes_the_mapping_beside_the_file_and_check_names_a_bad_edit(tmp_path):
    heart_schema().save(tmp_path / "schema.json")
    (tmp_path / "site").mkdir()
    dialect("si", canonical()).to_csv(tmp_path / "site" / "train.csv", index=False)
    runner = CliRunner()
    args = ["schema", "match", str(tmp_path / "site" / "train.csv"), "--schema", str(tmp_path / "schema.json")]
    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    mapping = json.loads((tmp_path / "site" / "mapping.json").read_text())
    assert mapping["columns"]["cholesterol_mmol_l"]["feature"] == "cholesterol"
    assert runner.invoke(app, args + ["--check"]).exit_code == 0
    dialect("si", canonical()).to_csv(tmp_path / "st-marys.csv", index=False)
    assert runner.invoke(app, ["schema", "match", str(tmp_path / "st-marys.csv"), "--schema", str(tmp_path / "schema.json")]).exit_code == 0
    assert (tmp_path / "st-marys.mapping.json").is_file()  # a site file's own mapping, not the folder's
    mapping["columns"]["sex"]["values"]["male"] = "X"
    (tmp_path / "site" / "mapping.json").write_text(json.dumps(mapping))
    checked = runner.invoke(app, args + ["--check"])
    assert checked.exit_code == 1 and "column 'sex' (feature 'sex'): 'values' maps to ['X']" in checked.output
