"""Apps send whole records: ``/v1/predict`` leaves out the fields that are no feature and names them; errors show values as JSON.

Issue 25: a row with a ``patient_id`` was refused (422) where ``fedmeta
predict`` and the Python API ignore other columns, and errors wrote the
client's JSON ``true`` as Python's ``True``.
"""

import httpx
import jsonschema

from site_server import ROW, SITE, auth, running, settings, site_home  # noqa: F401

RECORD = {**ROW, "patient_id": "MRN-0042-secret", "admitted_at": "2026-03-01T08:00"}


def test_fields_that_are_no_feature_are_left_out_and_named_by_name_only(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        whole = httpx.post(f"{url}/v1/predict", json={"rows": [RECORD, {**ROW, "bed": 7}]}, headers=h)
        plain = httpx.post(f"{url}/v1/predict", json={"rows": [ROW, ROW]}, headers=h)
    assert whole.status_code == 200, whole.text
    assert whole.json()["ignored_fields"] == ["admitted_at", "bed", "patient_id"]
    assert whole.json()["predictions"] == plain.json()["predictions"] and plain.json()["ignored_fields"] == []
    assert "MRN-0042" not in whole.text and "2026-03-01" not in whole.text


def test_strict_true_refuses_them_and_strict_takes_only_true_or_false(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        strict = httpx.post(f"{url}/v1/predict?strict=true", json={"row": RECORD}, headers=h)
        lenient = httpx.post(f"{url}/v1/predict?strict=false", json={"row": RECORD}, headers=h)
        exact = httpx.post(f"{url}/v1/predict?strict=true", json={"row": ROW}, headers=h)
        unclear = httpx.post(f"{url}/v1/predict?strict=yes", json={"row": ROW}, headers=h)
    assert strict.status_code == 422 and strict.json()["error"].startswith("row: unknown feature(s) ['admitted_at', 'patient_id']"), strict.text
    assert lenient.status_code == exact.status_code == 200 and lenient.json()["ignored_fields"] == ["admitted_at", "patient_id"]
    assert unclear.status_code == 422 and unclear.json()["error"] == 'strict: expected true or false (once), got "yes"'


def test_a_misspelt_feature_is_reported_missing_beside_the_fields_that_are_no_feature(site_home):
    home, keys = site_home
    row = {("agee" if k == "age" else k): v for k, v in ROW.items()}
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/predict", json={"rows": [ROW, row]}, headers=auth(keys["predict"]))
    assert r.status_code == 422 and r.json()["error"] == "rows[1]: missing feature 'age'; the row's fields that are no feature: ['agee']"


def test_the_document_describes_what_the_server_does_with_other_fields(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        spec = httpx.get(f"{url}/openapi.json", headers=h).json()
        answer = httpx.post(f"{url}/v1/predict", json={"row": RECORD}, headers=h).json()
    predict = spec["paths"]["/v1/predict"]["post"]
    request = predict["requestBody"]["content"]["application/json"]["schema"]
    jsonschema.validate({"row": RECORD}, request)  # the document accepts a whole record, as the server does
    jsonschema.validate(answer, predict["responses"]["200"]["content"]["application/json"]["schema"])
    assert "ignored_fields" in predict["responses"]["200"]["content"]["application/json"]["schema"]["required"]
    (strict,) = [p for p in predict["parameters"] if p["name"] == "strict"]
    assert strict["in"] == "query" and strict["schema"] == {"type": "boolean", "default": False} and "422" in strict["description"]


def test_errors_show_the_clients_values_as_json(site_home):
    home, keys = site_home
    ages = {"name": "age", "shape": [1], "datatype": "FP32", "data": [True]}
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        number = httpx.post(f"{url}/v1/predict", json={"row": {**ROW, "age": True}}, headers=h)
        category = httpx.post(f"{url}/v1/predict", json={"row": {**ROW, "ward": None}}, headers=h)
        data = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": [ages]}, headers=h)
        shape = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": [{**ages, "shape": [True]}]}, headers=h)
    assert number.json()["error"] == "row.age: expected a number, got true"
    assert category.json()["error"] == "row.ward: expected a category (string), got null"
    assert data.json()["error"] == "inputs.age.data: expected numbers, got true"
    assert shape.json()["error"] == "inputs.age.shape: must be [batch] or [batch, 1] with integer sizes, got [true]"
