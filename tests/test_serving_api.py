"""The site's prediction server, run for real: routes, roles, predictions, v2, swaps, head jobs, metrics, docs."""

import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from fedmeta.manifest import ManifestError
from serving import create_app
from serving.auth import KeyStore
from site_server import PATH_VALUES, ROW, SITE, auth, direct_onnx as _direct_onnx, free_port as _free_port, running, sepsis_rows as _sepsis_rows, served_routes, settings, site_home  # noqa: F401


# --- auth -------------------------------------------------------------------------------


def test_every_route_but_the_health_probes_needs_a_key_and_the_right_role(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        for method, path in [("POST", "/v1/predict"), ("GET", "/v1/models"), ("GET", f"/v2/models/{SITE}/ready"), ("GET", f"/v2/models/{SITE}"),
                             ("POST", f"/v2/models/{SITE}/infer"), ("GET", "/metrics"), ("POST", "/v1/heads"), ("POST", "/v1/models/rollback")]:
            r = httpx.request(method, url + path, json={})
            assert r.status_code == 401, path
            assert "missing API key" in r.json()["error"]
        r = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth("fm_not-a-key"))
        assert r.status_code == 401 and "invalid or revoked" in r.json()["error"]
        r = httpx.post(f"{url}/v1/models/v3/promote", headers=auth(keys["predict"]))
        assert r.status_code == 403 and "needs the 'admin' role" in r.json()["error"]
        r = httpx.post(f"{url}/v1/heads", json={"task": "x"}, headers=auth(keys["predict"]))
        assert r.status_code == 403 and "'department'" in r.json()["error"]
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers={"X-API-Key": keys["predict"]}).status_code == 200


def test_probes_without_a_key_learn_liveness_and_readiness_and_nothing_else(site_home):
    """Kubernetes and KServe probes send no key: the health routes answer them, naming no model, version or hash."""
    home, _ = site_home
    with running(settings(home)) as (url, app):
        live, ready = httpx.get(f"{url}/v2/health/live"), httpx.get(f"{url}/v2/health/ready")
        model = app.state.fedmeta.store.current
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert not [secret for secret in (model.site, model.label, model.version.sha256[:12]) if secret in live.text + ready.text]


def test_the_auth_module_docstring_names_every_route_with_the_smallest_role_it_admits(site_home):
    """``serving.auth``'s docstring is the reference for roles: each route's smallest admitted role, measured, matches it."""
    import re

    import serving.auth

    home, keys = site_home
    text = " ".join(serving.auth.__doc__.split())
    documented = {}
    for role, listed in re.findall(r"- (no key|``\w+``): (.*?)(?= - (?:no key|``\w+``):|$)", text):
        for route in re.findall(r"``((?:GET|POST) /[^`]*)``", listed):
            documented[route] = role.strip("`")
    measured = {}
    with running(settings(home, docs=True)) as (url, app):
        routes = served_routes(app)
        for route in sorted(routes):
            method, path = route.split(" ")
            for role, headers in [("no key", {}), *((role, auth(keys[role])) for role in ("predict", "department", "admin"))]:
                if httpx.request(method, url + path.format(**PATH_VALUES), json={}, headers=headers).status_code not in (401, 403):
                    measured[route] = role
                    break
    assert len(routes) >= 14 and documented == measured


def test_a_revoked_key_stops_working_on_the_running_server(site_home):
    home, _ = site_home
    store = KeyStore(home.path)
    key, secret = store.create("temp", "predict")
    with running(settings(home)) as (url, _):
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(secret)).status_code == 200
        store.revoke(key.id)
        time.sleep(1.1)  # the server re-reads the key file at most once a second
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(secret)).status_code == 401
    assert secret not in (home.path / "api_keys.json").read_text()


# --- prediction ---------------------------------------------------------------------------


def test_predict_returns_every_task_with_version_and_hash_and_matches_onnxruntime(site_home):
    home, keys = site_home
    rows = [ROW, {**ROW, "age": 45, "ward": "surgical", "sex": "M"}]
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/predict", json={"rows": rows}, headers=auth(keys["predict"]))
    assert r.status_code == 200, r.text
    body = r.json()
    v2 = home.registry.get(2)
    assert body["model"] == {"site": SITE, "version": "v2", "sha256": v2.sha256} and body["rows"] == 2
    feed = {k: np.array([row[k] for row in rows], dtype=object if isinstance(ROW[k], str) else np.float32) for k in ROW}
    readmission, mortality, stay = _direct_onnx(home, 2, feed)
    np.testing.assert_allclose(body["predictions"]["mortality"]["probabilities"], mortality, atol=1e-6)
    np.testing.assert_allclose(body["predictions"]["length_of_stay"]["values"], stay, atol=1e-5)
    assert body["predictions"]["readmission_30d"]["labels"] == [str(int(i)) for i in readmission.argmax(1)]


def test_predict_can_choose_tasks(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/predict", json={"row": ROW, "tasks": ["mortality"]}, headers=auth(keys["predict"]))
    assert list(r.json()["predictions"]) == ["mortality"]


BAD_BODIES = [
    ({"rows": [{k: v for k, v in ROW.items() if k != "sodium"}]}, 422, "rows[0]: missing feature 'sodium'"),
    ({"rows": [ROW, {**ROW, "age": "old"}]}, 422, 'rows[1].age: expected a number, got "old"'),
    ({"rows": [{**ROW, "age": None}]}, 422, "rows[0].age: missing value (null)"),
    ({"row": {**ROW, "ward": "oncology"}}, 422, 'row.ward: unknown category "oncology"'),
    ({"row": {**ROW, "sex": 1}}, 422, "row.sex: expected a category (string), got 1"),
    ({"rows": [ROW] * 51}, 413, "too many rows (51); the limit is 50"),
    ({"rows": []}, 422, "rows: expected a non-empty list of rows"),
    ({"row": ROW, "tasks": ["sepsis"]}, 422, "unknown task(s) ['sepsis']"),
    ({"features": ROW}, 422, "body: unknown field(s) ['features']"),
    ({}, 422, "expected 'rows' (a list of rows) or 'row' (one row)"),
    (["not", "an", "object"], 422, "expected an object with 'rows'"),
]


def test_every_bad_input_gets_a_4xx_naming_the_field_and_problem(site_home):
    home, keys = site_home
    with running(settings(home, max_rows=50, max_body_bytes=64 * 1024)) as (url, _):
        for body, status, message in BAD_BODIES:
            r = httpx.post(f"{url}/v1/predict", json=body, headers=auth(keys["predict"]))
            assert (r.status_code, message in r.json()["error"]) == (status, True), (body, r.text)
        nan = json.dumps({"row": ROW}).replace("71", "NaN")
        r = httpx.post(f"{url}/v1/predict", content=nan, headers={**auth(keys["predict"]), "Content-Type": "application/json"})
        assert r.status_code == 422 and "NaN" in r.json()["error"]
        r = httpx.post(f"{url}/v1/predict", content=b"{not json", headers={**auth(keys["predict"]), "Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        r = httpx.post(f"{url}/v1/predict", content=b"x" * 70_000, headers={**auth(keys["predict"]), "Content-Type": "application/json"})
        assert r.status_code == 413 and "exceeds the limit of 65536 bytes" in r.json()["error"]


def test_internal_errors_return_no_stack_trace(site_home, monkeypatch):
    home, keys = site_home
    with running(settings(home)) as (url, app):
        class Broken:
            def run(self, *a, **k):
                raise RuntimeError("secret internals at /srv/model.py line 42")

        current = app.state.fedmeta.store.current
        monkeypatch.setattr(app.state.fedmeta.store, "current", type(current)(current.version, current.manifest, Broken(), current.validator, current.site))
        r = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"]))
    assert r.status_code == 500
    assert "secret internals" not in r.text and "Traceback" not in r.text and "internal server error" in r.json()["error"]


# --- Open Inference Protocol v2 -------------------------------------------------------------


def _v2_inputs(rows):
    return [
        {"name": k, "shape": [len(rows)], "datatype": "BYTES" if isinstance(v, str) else "FP32", "data": [r[k] for r in rows]}
        for k, v in ROW.items()
    ]


def test_v2_metadata_health_and_infer_match_direct_onnxruntime(site_home):
    home, keys = site_home
    rows = [ROW, {**ROW, "age": 30, "admission_type": "elective"}, {**ROW, "wbc": 15.0}]
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        assert httpx.get(f"{url}/v2/health/ready", headers=h).json() == {"ready": True}
        assert httpx.get(f"{url}/v2/models/{SITE}/ready", headers=h).json() == {"name": SITE, "ready": True}
        meta = httpx.get(f"{url}/v2/models/{SITE}", headers=h).json()
        assert {"name": "ward", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
        assert {"name": "mortality", "datatype": "FP32", "shape": [-1, 2]} in meta["outputs"]
        r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"id": "req-7", "inputs": _v2_inputs(rows)}, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert httpx.get(f"{url}/v2/models/other", headers=h).status_code == 404
    assert body["id"] == "req-7" and body["model_name"] == SITE and body["model_version"] == "v2"
    feed = {k: np.array([row[k] for row in rows], dtype=object if isinstance(ROW[k], str) else np.float32) for k in ROW}
    expected = dict(zip(["readmission_30d", "mortality", "length_of_stay"], _direct_onnx(home, 2, feed)))
    for out in body["outputs"]:
        assert out["datatype"] == "FP32" and out["shape"] == list(expected[out["name"]].shape)
        np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(out["shape"]), expected[out["name"]])


def test_v2_infer_rejects_bad_tensors_by_name(site_home):
    home, keys = site_home
    good = _v2_inputs([ROW])
    cases = [
        ([t for t in good if t["name"] != "age"], "missing tensor 'age'"),
        ([{**t, "datatype": "FP32"} if t["name"] == "ward" else t for t in good], "inputs.ward.datatype: a categorical feature takes datatype BYTES"),
        ([{**t, "shape": [2]} if t["name"] == "age" else t for t in good], "inputs.age: shape [2] holds 2 values, data has 1"),
        ([{**t, "data": ["icu?"]} if t["name"] == "ward" else t for t in good], 'inputs.ward.data: unknown category "icu?"'),
    ]
    with running(settings(home)) as (url, _):
        for inputs, message in cases:
            r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": inputs}, headers=auth(keys["predict"]))
            assert r.status_code == 400 and message in r.json()["error"], r.text


# --- models, swaps, tampering ---------------------------------------------------------------------


def test_models_listing_and_admin_promote_and_rollback_swap_the_served_model(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        listing = httpx.get(f"{url}/v1/models", headers=auth(keys["predict"])).json()
        assert listing["promoted"] == "v2" and [v["version"] for v in listing["versions"]] == ["v1", "v2", "v3"]
        assert all(v["sha256"] for v in listing["versions"]) and "mortality.personalized.acc" in listing["versions"][1]["metrics"]
        r = httpx.post(f"{url}/v1/models/v3/promote", headers=auth(keys["admin"]))
        assert r.json() == {"promoted": "v3", "previous": "v2", "sha256": home.registry.get(3).sha256}
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"] == "v3"
        assert httpx.post(f"{url}/v1/models/rollback", headers=auth(keys["admin"])).json()["promoted"] == "v2"
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"] == "v2"
        assert httpx.post(f"{url}/v1/models/v1/promote", headers=auth(keys["admin"])).status_code == 409  # a global base
    actions = [(e.action, e.actor) for e in home.registry.audit() if e.action in ("promote", "rollback")]
    assert actions[-2:] == [("promote", "key:admin-app"), ("rollback", "key:admin-app")]


def test_hot_swap_under_concurrent_load_fails_no_request(site_home):
    home, keys = site_home
    failures, versions, stop = [], [], threading.Event()

    def client(url):
        with httpx.Client(headers=auth(keys["predict"]), timeout=10) as http:
            while not stop.is_set():
                r = http.post(f"{url}/v1/predict", json={"rows": [ROW] * 8})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    versions.append(r.json()["model"]["version"])

    with running(settings(home)) as (url, _):
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(8)]
        for t in threads:
            t.start()
        with httpx.Client(headers=auth(keys["admin"])) as admin:
            for _ in range(6):
                time.sleep(0.15)
                assert admin.post(f"{url}/v1/models/v3/promote").status_code == 200
                time.sleep(0.15)
                assert admin.post(f"{url}/v1/models/rollback").status_code == 200
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert len(versions) > 100 and {"v2", "v3"} <= set(versions)


def test_a_promotion_made_elsewhere_is_picked_up_without_restart(site_home):
    home, keys = site_home
    with running(settings(home, reload_interval=0.1)) as (url, _):
        home.registry.promote(SITE, 3, actor="cli-user")  # as `fedmeta models promote v3` would, from another process
        deadline = time.time() + 5
        while httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"] != "v3":
            assert time.time() < deadline, "the server did not follow the registry"
            time.sleep(0.05)


def test_a_tampered_promoted_model_refuses_to_start(site_home):
    home, _ = site_home
    model = home.folder(home.registry.get(2)) / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ManifestError, match="does not match the hash the registry recorded"):
        create_app(settings(home))
    out = subprocess.run([sys.executable, "-m", "fedmeta.cli", "serve", "--site-home", str(home.path), "--port", str(_free_port())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "refusing to start" in out.stdout


def test_a_tampered_version_is_never_promoted(site_home):
    home, keys = site_home
    model = home.folder(home.registry.get(3)) / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\x00")
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/models/v3/promote", headers=auth(keys["admin"]))
        assert r.status_code == 409 and "integrity check" in r.json()["error"]
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"] == "v2"
    assert home.registry.current(SITE).version == 2


# --- head requests -------------------------------------------------------------------------------


@pytest.mark.slow
def test_head_request_end_to_end_trains_registers_promotes_and_serves_the_new_task(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "kind": "binary", "rows": _sepsis_rows(), "promote": True}, headers=auth(keys["admin"]))
        assert r.status_code == 202, r.text
        job_url = url + r.json()["status_url"]
        deadline = time.time() + 120
        while (job := httpx.get(job_url, headers=auth(keys["admin"])).json())["status"] in ("queued", "running"):
            assert time.time() < deadline
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
        assert job["version"] == "v4" and job["promoted"] and "sepsis.head.auc" in job["metrics"]
        prediction = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()
    assert prediction["model"]["version"] == "v4" and prediction["predictions"]["sepsis"]["classes"] == ["no", "yes"]
    head = home.registry.get(4)
    assert (head.kind, head.parent) == ("head", 2)
    audit = [e for e in home.registry.audit() if e.action == "head_request"]
    assert audit and audit[0].actor == "key:admin-app" and audit[0].detail["task"] == "sepsis"


def test_head_requests_are_bounded_with_409_and_429(site_home):
    home, keys = site_home
    release = threading.Event()
    with running(settings(home, head_queue_limit=1)) as (url, app):
        jobs = app.state.fedmeta.jobs
        original = jobs._run
        jobs._run = lambda job, spec: (release.wait(30), original(job, spec))  # hold the worker so that jobs stay queued
        h = auth(keys["department"])
        body = {"kind": "binary", "rows": _sepsis_rows(30)}
        try:
            first = httpx.post(f"{url}/v1/heads", json={**body, "task": "sepsis", "label": "sepsis"}, headers=h)
            assert first.status_code == 202
            again = httpx.post(f"{url}/v1/heads", json={**body, "task": "sepsis", "label": "sepsis"}, headers=h)
            assert again.status_code == 409 and "already" in again.json()["error"]
            rows = [{**{k: v for k, v in r.items() if k != "sepsis"}, "delirium": r["sepsis"]} for r in body["rows"]]
            queued = httpx.post(f"{url}/v1/heads", json={"kind": "binary", "task": "delirium", "rows": rows}, headers=h)
            assert queued.status_code == 202, queued.text
            falls = [{**{k: v for k, v in r.items() if k != "sepsis"}, "falls": r["sepsis"]} for r in body["rows"]]
            full = httpx.post(f"{url}/v1/heads", json={"kind": "binary", "task": "falls", "rows": falls}, headers=h)
            assert full.status_code == 429 and "retry later" in full.json()["error"], full.text
        finally:
            release.set()


def test_head_request_rows_are_validated_before_a_job_starts(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        rows = _sepsis_rows(10)
        rows[3] = {**rows[3], "ward": "oncology"}
        r = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "kind": "binary", "rows": rows}, headers=auth(keys["department"]))
        assert r.status_code == 422 and 'rows[3].ward: unknown category "oncology"' in r.json()["error"]
        r = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "kind": "trinary", "rows": rows}, headers=auth(keys["department"]))
        assert r.status_code == 422 and "kind" in r.json()["error"]


# --- operations ------------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_and_status_and_predictions_by_task(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        httpx.post(f"{url}/v1/predict", json={"rows": [ROW] * 3}, headers=h)
        httpx.post(f"{url}/v1/predict", json={"rows": [{}]}, headers=h)
        text = httpx.get(f"{url}/metrics", headers=h).text
    assert 'fedmeta_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    assert 'fedmeta_requests_total{method="POST",route="/v1/predict",status="422"} 1.0' in text
    assert 'fedmeta_predictions_total{task="mortality"} 3.0' in text
    assert 'fedmeta_request_duration_seconds_count{route="/v1/predict"} 2.0' in text
    assert f'site="{SITE}",version="v2"}} 1.0' in text and "fedmeta_model_info{sha256=" in text


def test_openapi_docs_describe_every_route_with_examples(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        spec = httpx.get(f"{url}/openapi.json", headers=auth(keys["predict"])).json()
    routes = {(method.upper(), path): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    expected = {("POST", "/v1/predict"), ("POST", "/v2/models/{name}/infer"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"),
                ("GET", "/v2/models/{name}"), ("GET", "/v2/models/{name}/ready"), ("GET", "/v1/models"), ("POST", "/v1/models/{version}/promote"),
                ("POST", "/v1/models/rollback"), ("POST", "/v1/heads"), ("GET", "/v1/heads/jobs/{job_id}"), ("GET", "/metrics")}
    assert expected <= set(routes)
    assert all(routes[r].get("summary") for r in expected)
    for r in [("POST", "/v1/predict"), ("POST", "/v2/models/{name}/infer"), ("POST", "/v1/heads")]:
        content = routes[r]["requestBody"]["content"]["application/json"]
        assert content.get("example") or content.get("examples"), r
    for (method, path), op in routes.items():  # every error documented with the body the server sends
        errors = {int(code): r for code, r in op["responses"].items() if int(code) >= 400}
        assert all(r["content"]["application/json"]["schema"]["required"] == ["error"] for r in errors.values()), (method, path)
        if op.get("security"):
            assert {401, 403, 503} <= set(errors), (method, path)
        if "requestBody" in op:
            assert {413, 415} <= set(errors), (method, path)
    assert "HTTPValidationError" not in json.dumps(spec)
    predict = routes[("POST", "/v1/predict")]["requestBody"]["content"]["application/json"]["schema"]
    assert predict["oneOf"] == [{"required": ["rows"]}, {"required": ["row"]}] and predict["additionalProperties"] is False  # {} is not valid
    row = predict["properties"]["row"]
    assert set(row["required"]) == set(ROW) and set(row["properties"]["ward"]["enum"]) == {"cardiology", "icu", "medical", "surgical"}
    assert routes[("POST", "/v1/heads")]["requestBody"]["content"]["application/json"]["schema"]["properties"]["task"]["pattern"] == "^[A-Za-z][A-Za-z0-9_-]{0,63}$"


def test_the_server_package_does_not_import_flower():
    code = "import sys, serving.app; sys.exit(1 if any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_keys_cli_shows_a_secret_once_and_stores_only_its_hash(tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--role", "department", "--name", "cardiology", "--site-home", str(tmp_path)])
    assert created.exit_code == 0, created.output
    secret = created.output.strip().splitlines()[-1]
    assert secret.startswith("fm_")
    listing = runner.invoke(app, ["keys", "list", "--site-home", str(tmp_path)])
    assert "cardiology" in listing.output and secret not in listing.output
    assert secret not in (tmp_path / "api_keys.json").read_text()
    key_id = KeyStore(tmp_path).keys()[0].id
    assert runner.invoke(app, ["keys", "revoke", key_id, "--site-home", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["keys", "revoke", key_id, "--site-home", str(tmp_path)]).exit_code == 2
    bad = runner.invoke(app, ["keys", "create", "--role", "root", "--name", "x", "--site-home", str(tmp_path)])
    assert bad.exit_code == 2 and "role must be one of" in bad.output
