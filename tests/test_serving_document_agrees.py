"""The OpenAPI document accepts what the server accepts, in the three places schemathesis found them apart (issue 25).

Each test asks both sides about the same bodies: the request schema of the
generated document (``app.openapi()``, validated with jsonschema) and the
app itself (FastAPI's TestClient, in-process).
"""

import math

import jsonschema
import pytest
from fastapi.testclient import TestClient

from fedmeta.registry import SiteHome
from serving import create_app
from serving.auth import KeyStore
from site_server import ROW, SITE, auth, publish_version, settings


@pytest.fixture(scope="module")
def served(tmp_path_factory, hospitals, base_run):
    """A TestClient on a one-version site home, the document, and a department key (which may also predict)."""
    home = SiteHome(tmp_path_factory.mktemp("agrees") / "home")
    publish_version(home, hospitals, base_run, seed=1, promote=True)
    key = KeyStore(home.path).create("department-app", "department")[1]
    app = create_app(settings(home, head_queue_limit=0))
    with TestClient(app) as client:
        yield client, app.openapi(), auth(key)


def body_schema(document: dict, path: str) -> dict:
    return document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def document_accepts(document: dict, path: str, body: dict) -> bool:
    return jsonschema.Draft202012Validator(body_schema(document, path)).is_valid(body)


def test_a_head_request_for_a_new_task_without_its_kind_is_outside_the_document(served):
    client, document, key = served
    rows = [{**ROW, "sepsis": "yes"}, {**ROW, "sepsis": "no"}]
    new_without_kind = {"task": "sepsis", "rows": rows}
    r = client.post("/v1/heads", json=new_without_kind, headers=key)
    assert r.status_code == 422 and r.json()["error"].startswith("kind: task 'sepsis' is new"), r.text
    assert not document_accepts(document, "/v1/heads", new_without_kind)
    assert not document_accepts(document, "/v1/heads", {"rows": [{}], "task": "A"})  # schemathesis's case
    # The rule, not a blanket refusal: the same rows with a kind, and a known task without one, fit the document.
    assert document_accepts(document, "/v1/heads", {**new_without_kind, "kind": "binary"})
    assert document_accepts(document, "/v1/heads", {"task": "mortality", "rows": [{**ROW, "died_in_hospital": 1}]})
    assert not document_accepts(document, "/v1/heads", {"task": "mortality", "kind": "regression", "rows": rows})


def test_each_numeric_feature_is_bounded_in_the_document_exactly_where_the_server_bounds_it(served):
    client, document, key = served
    properties = body_schema(document, "/v1/predict")["properties"]["row"]["properties"]
    numeric = client.app.state.fedmeta.store.current.validator.numeric
    for name in numeric:
        lo, hi = properties[name]["minimum"], properties[name]["maximum"]
        for inside in (lo, hi):
            body = {"row": {**ROW, name: inside}}
            assert document_accepts(document, "/v1/predict", body)
            r = client.post("/v1/predict", json=body, headers=key)
            assert r.status_code == 200, (name, inside, r.text)
        for outside in (math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)):
            body = {"row": {**ROW, name: outside}}
            assert not document_accepts(document, "/v1/predict", body)
            r = client.post("/v1/predict", json=body, headers=key)
            assert r.status_code == 422 and r.json()["error"].startswith(f"row.{name}: "), (name, outside, r.text)


def test_inference_data_is_never_null_in_the_document_as_in_the_server(served):
    client, document, key = served
    inputs = [{"name": name, "shape": [1], "datatype": "BYTES" if isinstance(value, str) else "FP32", "data": [value]} for name, value in ROW.items()]
    path = f"/v2/models/{SITE}/infer"
    for data, shape in (([ROW["age"]], [1]), ([[ROW["age"]]], [1, 1])):  # controls: flat and nested rows are accepted by both
        body = {"inputs": [{**t, "data": data, "shape": shape} if t["name"] == "age" else t for t in inputs]}
        assert document_accepts(document, "/v2/models/{name}/infer", body)
        assert client.post(path, json=body, headers=key).status_code == 200
    for name in ("age", "sex"):  # a numeric and a categorical tensor
        body = {"inputs": [{**t, "data": [None]} if t["name"] == name else t for t in inputs]}
        r = client.post(path, json=body, headers=key)
        assert r.status_code == 400 and r.json()["error"].startswith(f"inputs.{name}.data: "), r.text
        assert not document_accepts(document, "/v2/models/{name}/infer", body)
