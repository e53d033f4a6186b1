"""The server reads requests in the site's own dialect (columns, codes, units) through the mapping its promoted model recorded.

Issue 26, item 3: a site's apps send what their own systems produce, and get the prediction of the canonical row.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedmeta.predict
from fedmeta.cli import app
from fedmeta.data import load_federation
from fedmeta.data.mapping import ColumnMapping, Mapping
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir
from fedmeta.registry import SiteHome
from serving.auth import KeyStore
from serving.dialect import Dialect
from serving.errors import ApiError
from site_server import auth, running, settings
from test_mapping_sites import CHOL_MMOL, canonical_rows, dialect_mapping, dialect_rows, heart_schema, write_site

SITE = "st-marys"
FAST = ["--mode", "all", "--shots", "4", "--steps", "5", "--no-alone", "--seed", "0"]


@pytest.fixture(scope="module")
def heart(tmp_path_factory) -> Path:
    """st-marys in the schema's dialect and in its own (beside a mapping.json), each with test rows, and a round-0 base."""
    root = tmp_path_factory.mktemp("heart")
    rows, test = canonical_rows(40), canonical_rows(12)
    write_site(root / "canonical", SITE, rows, test=test)
    write_site(root / "dialect", SITE, dialect_rows(rows), dialect_mapping(heart_schema()), test=dialect_rows(test))
    config = RunConfig.from_dict({"name": "base", "model": {"hidden": [8]}, "federation": {"kind": "csv", "data_dir": str(root / "canonical")}})
    run = RunDir(root / "run")
    run.create(config)
    run.save_base_model(initial_state(config), config, round_=1, statistics=load_federation(root / "canonical")[0].schema.statistics())
    return root


def personalized_home(heart: Path, dialect: str, home: Path) -> tuple[SiteHome, str]:
    """``fedmeta personalize`` on the site's files in ``dialect`` (the mapping picked up beside them), and a predict key."""
    site = heart / dialect / SITE
    result = CliRunner().invoke(app, ["personalize", "--data", str(site / "train.csv"), "--test", str(site / "test.csv"), "--schema",
                                      str(heart / dialect / "schema.json"), "--base", str(heart / "run"), "--site-home", str(home), *FAST])
    assert result.exit_code == 0, result.output
    return SiteHome(home), KeyStore(home).create("app", "predict")[1]


@pytest.fixture(scope="module")
def mapped(heart, tmp_path_factory):
    """A real server on st-marys' model personalized through its mapping: (url, key, site home)."""
    home, key = personalized_home(heart, "dialect", tmp_path_factory.mktemp("home-mapped"))
    assert home.load(home.current(SITE))[0].mapping is not None
    with running(settings(home)) as (url, _):
        yield url, key, home


@pytest.fixture(scope="module")
def unmapped(heart, tmp_path_factory):
    """A real server on st-marys' model personalized from files already in the schema's dialect (no mapping recorded)."""
    home, key = personalized_home(heart, "canonical", tmp_path_factory.mktemp("home-unmapped"))
    with running(settings(home)) as (url, _):
        yield url, key


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as an app sends them: JSON values (categories as strings where the schema's dialect needs them)."""
    out = frame.drop(columns=[c for c in ("target", "HeartDisease") if c in frame]).to_dict("records")
    for row in out:
        if "sex" in row:
            row["sex"] = str(row["sex"])
    return out


def test_site_rows_get_the_predictions_of_their_canonical_rows_and_of_fedmeta_predict(mapped, heart):
    url, key, home = mapped
    site_rows = pd.read_csv(heart / "dialect" / SITE / "test.csv")
    canonical = pd.read_csv(heart / "canonical" / SITE / "test.csv")
    assert set(records(site_rows)[0]) == {"patient_id", "Cholesterol_mmol_L", "Sex", "ChestPainType", "AGE_YRS"}  # no schema name among them
    a = httpx.post(f"{url}/v1/predict", json={"rows": records(site_rows)}, headers=auth(key))
    b = httpx.post(f"{url}/v1/predict", json={"rows": records(canonical)}, headers=auth(key))
    assert a.status_code == b.status_code == 200, a.text + b.text
    served, twin = a.json()["predictions"]["disease"], b.json()["predictions"]["disease"]
    assert served["labels"] == twin["labels"]
    np.testing.assert_allclose(served["probabilities"], twin["probabilities"], rtol=1e-6)
    assert a.json()["ignored_fields"] == ["patient_id"] and b.json()["ignored_fields"] == []
    # An independent path: fedmeta.predict reads the site's file through the same recorded mapping.
    offline = fedmeta.predict.predict(site_rows, site_home=home.path, site=SITE)
    np.testing.assert_allclose(np.array(served["probabilities"])[:, 1], offline["disease.p_1"], rtol=1e-5)


def test_one_site_row_alone_and_a_row_mixing_site_columns_with_schema_names_read_as_the_canonical_row(mapped):
    url, key, _ = mapped
    canonical = {"age": 61, "sex": "1", "chol": 5.2 * CHOL_MMOL, "cp": "atypical"}
    site = {"AGE_YRS": 61, "Sex": "M", "Cholesterol_mmol_L": 5.2, "ChestPainType": 2}
    mixed = {"AGE_YRS": 61, "Sex": "M", "chol": 5.2 * CHOL_MMOL, "cp": "atypical"}  # Sex says: the site's dialect; chol and cp keep their names
    answers = [httpx.post(f"{url}/v1/predict", json={"row": row}, headers=auth(key)) for row in (canonical, site, mixed)]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    p = [r.json()["predictions"]["disease"]["probabilities"][0] for r in answers]
    np.testing.assert_allclose(p[1], p[0], rtol=1e-6)
    np.testing.assert_allclose(p[2], p[0], rtol=1e-6)


def test_the_v2_protocol_takes_tensors_named_by_site_columns(mapped):
    url, key, _ = mapped

    def infer(inputs):
        r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": inputs}, headers=auth(key))
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    canonical = infer([{"name": "age", "shape": [2], "datatype": "FP32", "data": [61, 45]},
                       {"name": "sex", "shape": [2], "datatype": "BYTES", "data": ["1", "0"]},
                       {"name": "chol", "shape": [2], "datatype": "FP32", "data": [5.2 * CHOL_MMOL, 6.1 * CHOL_MMOL]},
                       {"name": "cp", "shape": [2], "datatype": "BYTES", "data": ["atypical", "asymptomatic"]}])
    site = infer([{"name": "AGE_YRS", "shape": [2], "datatype": "INT32", "data": [61, 45]},
                  {"name": "Sex", "shape": [2], "datatype": "BYTES", "data": ["M", "F"]},
                  {"name": "Cholesterol_mmol_L", "shape": [2, 1], "datatype": "FP32", "data": [[5.2], [6.1]]},
                  {"name": "ChestPainType", "shape": [2], "datatype": "INT32", "data": [2, 4]}])
    np.testing.assert_allclose(site, canonical, rtol=1e-6)


def test_a_site_code_the_mapping_lacks_is_a_422_naming_the_column_and_never_the_value(mapped):
    url, key, _ = mapped
    row = {"AGE_YRS": 61, "Sex": "Q7", "Cholesterol_mmol_L": 5.2, "ChestPainType": 2}
    r = httpx.post(f"{url}/v1/predict", json={"row": row}, headers=auth(key))
    assert r.status_code == 422
    message = r.json()["error"]
    assert message.startswith("row: column 'Sex' (feature 'sex'): 1 site value(s) have no schema value") and "\n" not in message
    assert "Q7" not in message
    v2 = httpx.post(f"{url}/v2/models/{SITE}/infer", headers=auth(key), json={"inputs": [
        {"name": k, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP32", "data": [v]} for k, v in row.items()]})
    assert v2.status_code == 400 and "column 'Sex' (feature 'sex')" in v2.json()["error"] and "Q7" not in v2.json()["error"]


def test_a_site_value_out_of_the_features_range_is_a_422_naming_the_feature_without_the_value(mapped):
    url, key, _ = mapped
    r = httpx.post(f"{url}/v1/predict", json={"row": {"AGE_YRS": "61", "Sex": "M", "Cholesterol_mmol_L": 2.5e12, "ChestPainType": 2}}, headers=auth(key))
    assert r.status_code == 422
    message = r.json()["error"]
    assert message.startswith("row.chol: its value, read through the site's mapping, is more than 1e6 standard deviations from the federation's mean")
    assert "2.5e" not in message and "9.6" not in message  # neither the site's value nor the converted one (9.67e13)


def test_a_site_row_missing_a_feature_names_the_feature_and_its_site_column(mapped):
    url, key, _ = mapped
    r = httpx.post(f"{url}/v1/predict", json={"rows": [{"AGE_YRS": 61, "Sex": "M", "ChestPainType": 2}]}, headers=auth(key))
    assert r.status_code == 422
    assert r.json()["error"] == "rows[0]: missing feature 'chol' (site column 'Cholesterol_mmol_L' or 'chol')"


def test_the_openapi_document_describes_the_site_columns_beside_the_schemas_features(mapped):
    url, key, _ = mapped
    document = httpx.get(f"{url}/openapi.json", headers=auth(key)).json()
    body = document["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema_row, site_row = body["properties"]["rows"]["items"]["anyOf"]
    assert set(schema_row["required"]) == {"age", "sex", "chol", "cp"}
    columns = site_row["properties"]
    assert columns["Cholesterol_mmol_L"]["description"].startswith(f"site column, mapped to chol (x {CHOL_MMOL:g});")
    assert columns["Sex"]["description"] in ("site column, mapped to sex (M -> 1, F -> 0)", "site column, mapped to sex (F -> 0, M -> 1)")
    assert {"M", "F"} <= set(columns["Sex"]["enum"])
    assert {"1", 1} <= set(columns["ChestPainType"]["enum"])
    assert columns["patient_id"]["description"] == "site column, left out (the mapping maps it to null)"
    assert {"oneOf": [{"required": ["Cholesterol_mmol_L"]}, {"required": ["chol"]}]} in site_row["allOf"]
    assert "dialect" in [p["name"] for p in document["paths"]["/v1/predict"]["post"]["parameters"]]
    tensors = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "Cholesterol_mmol_L" in [t["properties"]["name"]["enum"][0] for t in tensors["properties"]["inputs"]["items"]["oneOf"]]


def test_the_openapi_document_gives_head_requests_rows_in_either_dialect_only_for_a_model_with_a_mapping(mapped, unmapped):
    documents = [httpx.get(f"{url}/openapi.json", headers=auth(key)).json() for url, key, *_ in (mapped, unmapped)]
    heads = [d["paths"]["/v1/heads"]["post"] for d in documents]
    rows = [h["requestBody"]["content"]["application/json"]["schema"]["properties"]["rows"]["items"] for h in heads]
    schema_row, site_row = rows[0]["anyOf"]
    assert schema_row["maxProperties"] == 5 and "Cholesterol_mmol_L" in site_row["properties"]  # four features and the label
    assert "dialect" in [p["name"] for p in heads[0]["parameters"]]
    assert "anyOf" not in rows[1] and "dialect" not in [p["name"] for p in heads[1].get("parameters", [])]


def test_a_model_without_a_mapping_refuses_site_columns_as_before_and_documents_none(unmapped):
    url, key = unmapped
    site = {"AGE_YRS": 61, "Sex": "M", "Cholesterol_mmol_L": 5.2, "ChestPainType": 2}
    r = httpx.post(f"{url}/v1/predict?dialect=site", json={"row": site}, headers=auth(key))
    assert r.status_code == 422
    assert r.json()["error"].startswith("row: missing feature 'age'; the row's fields that are no feature: ")
    assert httpx.post(f"{url}/v1/predict", json={"row": {"age": 61, "sex": "1", "chol": 201.1, "cp": "typical"}}, headers=auth(key)).status_code == 200
    document = httpx.get(f"{url}/openapi.json", headers=auth(key)).json()
    body = document["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "anyOf" not in body["properties"]["rows"]["items"] and "Sex" not in str(body)
    assert "dialect" not in [p["name"] for p in document["paths"]["/v1/predict"]["post"]["parameters"]]


# --- the rule for rows that could be in either dialect (serving.dialect, no server needed) ------------------------------

def months_dialect() -> Dialect:
    """A site whose ``age`` column holds months (same name as the feature, another unit) and whose ``Sex`` is M/F."""
    mapping = Mapping(columns={"age": ColumnMapping(feature="age", scale=1 / 12), "Sex": ColumnMapping(feature="sex", values={"M": "1", "F": "0"})})
    return Dialect(mapping, heart_schema())


def test_a_row_whose_only_site_column_is_a_converted_feature_name_is_refused_naming_it_unless_the_dialect_is_given():
    dialect = months_dialect()
    with pytest.raises(ApiError) as refused:
        dialect.in_site_dialect({"age", "sex", "chol", "cp"}, "rows[2]", "auto")
    assert refused.value.status == 422
    assert refused.value.message.startswith("rows[2].age: both a schema feature and a site column (site column, mapped to age (x 0.08333")
    assert dialect.in_site_dialect({"age", "sex", "chol", "cp"}, "rows[2]", "site") is True
    assert dialect.in_site_dialect({"age", "sex", "chol", "cp"}, "rows[2]", "schema") is False


def test_a_site_only_column_decides_the_site_dialect_and_a_row_without_one_or_a_converted_name_is_the_schemas():
    dialect = months_dialect()
    assert dialect.in_site_dialect({"age", "Sex", "chol", "cp"}, "row", "auto") is True
    plain = Dialect(Mapping(columns={"Sex": ColumnMapping(feature="sex", values={"M": "1", "F": "0"})}), heart_schema())
    assert plain.in_site_dialect({"age", "sex", "chol", "cp"}, "row", "auto") is False
    converted = dialect.rows([{"age": 720, "Sex": "F", "chol": 200.0, "cp": "typical"}], "rows", "auto", strict=False)[0]
    assert converted == [{"age": 60.0, "sex": "0", "chol": 200.0, "cp": "typical"}]


def test_a_site_rows_category_sent_as_a_number_reads_as_its_string_as_fedmeta_predict_reads_a_file():
    plain = Dialect(Mapping(columns={"Sex": ColumnMapping(feature="sex", values={"M": "1", "F": "0"})}), heart_schema())
    converted, _, _ = plain.rows([{"age": 60, "Sex": 1.0, "chol": 200.0, "cp": "typical"}, {"age": 70, "Sex": "F", "chol": 210.5, "cp": "atypical"}],
                              "rows", "auto", strict=False)
    assert converted == [{"age": 60, "sex": "1", "chol": 200.0, "cp": "typical"}, {"age": 70, "sex": "0", "chol": 210.5, "cp": "atypical"}]


def test_a_site_rows_field_that_neither_the_mapping_nor_the_schema_names_is_left_out_and_named_or_with_strict_refused():
    dialect = Dialect(dialect_mapping(heart_schema()).model_copy(update={"schema_digest": None}), heart_schema())
    row = {"AGE_YRS": 61, "Sex": "M", "Cholesterol_mmol_L": 5.2, "ChestPainType": 2, "patient_id": "A-1", "nickname": "x"}
    assert dialect.rows([row], "rows", "auto", strict=False)[1] == ["nickname", "patient_id"]  # patient_id: mapped to null
    with pytest.raises(ApiError) as refused:
        dialect.rows([row], "rows", "auto", strict=True)
    assert refused.value.message == "rows[0]: unknown field(s) ['nickname']; neither a feature nor a site column of the model's mapping"


def test_v2_tensors_whose_only_site_column_is_a_converted_feature_name_need_the_dialect_parameter():
    from types import SimpleNamespace

    from serving.store import RowValidator
    from serving.v2 import _feed

    model = SimpleNamespace(dialect=months_dialect(), validator=RowValidator(heart_schema().model_dump(exclude_none=True), 10))  # what _feed reads of a model
    inputs = [{"name": "age", "shape": [1], "datatype": "FP32", "data": [720]}, {"name": "sex", "shape": [1], "datatype": "BYTES", "data": ["1"]},
              {"name": "chol", "shape": [1], "datatype": "FP32", "data": [200]}, {"name": "cp", "shape": [1], "datatype": "BYTES", "data": ["typical"]}]
    with pytest.raises(ApiError) as refused:
        _feed(model, inputs, 10)
    assert refused.value.status == 400 and refused.value.message.startswith("inputs.age: both a schema feature and a site column")
    assert refused.value.message.endswith('add "parameters": {"dialect": "site"} (or "schema")')
    assert _feed(model, inputs, 10, "site")[0]["age"].tolist() == [60.0]
    assert _feed(model, inputs, 10, "schema")[0]["age"].tolist() == [720.0]
