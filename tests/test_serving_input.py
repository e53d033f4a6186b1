"""Hostile and careless input: every bad value is a 4xx naming the field, checked before any work starts."""

import gzip
import json
import logging
import os
import time

import httpx
import pytest

from site_server import ROW, SITE, auth, running, sepsis_rows, settings, site_home  # noqa: F401


def _v2_inputs(rows):
    return [
        {"name": k, "shape": [len(rows)], "datatype": "BYTES" if isinstance(v, str) else "FP32", "data": [r[k] for r in rows]}
        for k, v in ROW.items()
    ]


def _with(inputs, name, **changes):
    return [{**t, **changes} if t["name"] == name else t for t in inputs]


# --- versions and v2 tensors (issue 16, item 1) ----------------------------------------------------


def test_v2_non_string_datatypes_and_non_integer_shapes_get_400_naming_the_field(site_home):
    home, keys = site_home
    good = _v2_inputs([ROW])
    cases = [
        (_with(good, "age", datatype=["FP32"]), "inputs.age.datatype"),
        (_with(good, "ward", datatype={"t": "BYTES"}), "inputs.ward.datatype"),
        (_with(good, "age", datatype=None), "inputs.age.datatype"),
        (_with(good, "age", shape=[[1]]), "inputs.age.shape"),
        (_with(good, "age", shape=["1"]), "inputs.age.shape"),
        (_with(good, "age", shape=[True]), "inputs.age.shape"),
        (_with(good, "age", shape=[1.5]), "inputs.age.shape"),
        (_with(good, "age", data=[[[71]]]), "inputs.age"),
        (good + [good[0]], "given twice"),
    ]
    with running(settings(home)) as (url, _):
        for inputs, field in cases:
            r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": inputs}, headers=auth(keys["predict"]))
            assert r.status_code == 400 and field in r.json()["error"], (inputs, r.text)
        r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"id": ["x"], "inputs": good}, headers=auth(keys["predict"]))
        assert r.status_code == 400 and r.json()["error"].startswith("id:")


@pytest.mark.parametrize("version", ["v99999999999999999999", "v9223372036854775808", "v²", "v₁", "v٣", "v0", "v-1", "v 3"])
def test_promote_refuses_versions_that_are_not_ascii_digits_in_range_with_422(site_home, version):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/models/{version}/promote", headers=auth(keys["admin"]))
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith("version: not a model version")
    assert home.registry.current(SITE).version == 2  # "v٣" does not promote v3


@pytest.mark.parametrize("version", ["v²", "v99999999999999999999", "v٣"])
def test_the_cli_refuses_such_versions_with_a_message(site_home, version):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    home, _ = site_home
    out = CliRunner().invoke(app, ["models", "promote", version, "--site-home", str(home.path)])
    assert out.exit_code == 2 and "not a model version" in out.output, out.output
    assert home.registry.current(SITE).version == 2


# --- request framing (item 10) ----------------------------------------------------------------------


def test_bodies_must_be_declared_json_and_uncompressed(site_home):
    home, keys = site_home
    body = json.dumps({"row": ROW}).encode()
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        for headers, expected in [
            ({"Content-Type": "text/plain"}, "Content-Type: unsupported media type 'text/plain'"),
            ({}, "Content-Type: missing"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, "unsupported media type"),
        ]:
            r = httpx.post(f"{url}/v1/predict", content=body, headers={**h, **headers})
            assert r.status_code == 415 and expected in r.json()["error"], r.text
        r = httpx.post(f"{url}/v1/predict", content=gzip.compress(body), headers={**h, "Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.status_code == 415 and "unsupported encoding" in r.json()["error"]
        r = httpx.post(f"{url}/v2/models/{SITE}/infer", content=body, headers={**h, "Content-Type": "text/csv"})
        assert r.status_code == 415
        assert httpx.post(f"{url}/v1/predict", content=body, headers={**h, "Content-Type": "application/json; charset=utf-8"}).status_code == 200


def test_float32_overflow_and_single_row_errors_name_the_field_as_sent(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        r = httpx.post(f"{url}/v1/predict", json={"row": {**ROW, "age": 1e39}}, headers=h)
        assert r.status_code == 422 and r.json()["error"].startswith("row.age: 1e+39 is outside the float32 range"), r.text
        r = httpx.post(f"{url}/v1/predict", json={"rows": [ROW, {**ROW, "wbc": -1e39}]}, headers=h)
        assert r.status_code == 422 and r.json()["error"].startswith("rows[1].wbc: -1e+39 is outside the float32 range"), r.text
        r = httpx.post(f"{url}/v1/predict?strict=true", json={"row": {**ROW, "bmi": 31}}, headers=h)
        assert r.status_code == 422 and r.json()["error"].startswith("row: unknown feature(s) ['bmi']"), r.text
        r = httpx.post(f"{url}/v1/predict", json={"row": {**ROW, "age": 18446744073709551616}}, headers=h)  # float32 holds it; the model cannot
        assert r.status_code == 422 and r.json()["error"].startswith("row.age: 1.8446744073709552e+19 is more than 1e6 standard deviations"), r.text
        r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": _with(_v2_inputs([ROW]), "age", data=[1e30])}, headers=h)
        assert r.status_code == 400 and r.json()["error"].startswith("inputs.age.data: 1e+30 is more than 1e6 standard deviations"), r.text
        r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": _with(_v2_inputs([ROW]), "age", data=[1e39])}, headers=h)
        assert r.status_code == 400 and r.json()["error"].startswith("inputs.age.data: 1e+39 is outside the float32 range"), r.text


def test_a_deep_value_is_refused_without_echoing_it(site_home):
    home, keys = site_home
    deep = "[" * 30 + "1" + "]" * 30
    body = json.dumps({"row": {**ROW, "age": "X"}}).replace('"X"', deep)
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/predict", content=body, headers={**auth(keys["predict"]), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "row.age: expected a number, got a JSON array"


# --- task names (item 2) -----------------------------------------------------------------------------

BAD_TASK_NAMES = ["inj\nfedmeta_forged_total 42\n# ", "sepsis.v2", "age", "forward", "training", "", "x" * 65, "1abc", "sep sis", "sépsis"]


def test_task_names_outside_the_documented_pattern_get_422_before_a_job_is_queued(site_home):
    home, keys = site_home
    rows = sepsis_rows(30)
    with running(settings(home)) as (url, _):
        for name in BAD_TASK_NAMES:
            r = httpx.post(f"{url}/v1/heads", json={"task": name, "kind": "binary", "label": "sepsis", "rows": rows}, headers=auth(keys["department"]))
            assert r.status_code == 422 and r.json()["error"].startswith("task"), (name, r.text)
        text = httpx.get(f"{url}/metrics", headers=auth(keys["predict"])).text
    assert not [e for e in home.registry.audit() if e.action == "head_request"]
    assert "fedmeta_forged_total" not in text


def test_the_metrics_exposition_escapes_every_label_value():
    from serving.metrics import Metrics

    metrics = Metrics(lambda: {"site": 'a"b', "version": "v1\nforged 1", "sha256": "x"})
    forged = "inj\nfedmeta_forged_total 42\n# "
    metrics.observe("/v1/predict", "POST", 200, 0.001, ([forged], 1, [{"row": 0, "features": [forged]}]))
    lines = metrics.exposition().decode().splitlines()
    assert not [line for line in lines if line.startswith(("fedmeta_forged_total", "forged"))]
    assert any(r'task="inj\nfedmeta_forged_total 42\n# "' in line for line in lines)
    assert any(r'fedmeta_outside_training_range_total{feature="inj\nfedmeta_forged_total 42\n# "}' in line for line in lines)


# --- head requests that cannot succeed (item 4) -------------------------------------------------------


def test_head_requests_that_cannot_succeed_get_422_naming_the_field_before_a_job_is_queued(site_home):
    home, keys = site_home
    rows = sepsis_rows(30)
    regression = [{**{k: v for k, v in r.items() if k != "sepsis"}, "score": v} for r, v in zip(rows, [1e308, -1e308] * 15)]
    cases = [
        ({"task": "mortality", "kind": "regression", "rows": rows}, "task: task 'mortality' is binary"),
        ({"task": "sepsis", "kind": "binary", "label": "died_in_hospital", "rows": rows}, "label: column 'died_in_hospital' is already the label of task 'mortality'"),
        ({"task": "sepsis", "kind": "binary", "label": "wbc", "rows": rows}, "label: 'wbc' is a feature"),
        ({"task": "sepsis", "kind": "binary", "label": "se.psis", "rows": rows}, "label: String should match pattern"),
        ({"task": "score", "kind": "regression", "rows": regression}, "rows[0].score: 1e+308 is outside the float32 range"),
        ({"task": "sepsis", "kind": "binary", "rows": [{**r, "sepsis": "yes"} for r in rows]}, "needs labelled rows of at least two classes"),
        ({"task": "sepsis", "kind": "binary", "rows": [{**r, "sepsis": [1]} for r in rows]}, "rows[0].sepsis: expected a class value"),
        ({"task": "sepsis", "kind": "binary", "rows": [{k: v for k, v in r.items() if k != "sepsis"} for r in rows]}, "rows: no row has a value for the label 'sepsis'"),
        ({"task": "sepsis", "kind": "binary", "rows": rows, "steps": 0}, "steps:"),
        ({"task": "sepsis", "kind": "binary", "rows": rows, "colour": "red"}, "colour: Extra inputs are not permitted"),
    ]
    with running(settings(home)) as (url, _):
        for body, message in cases:
            r = httpx.post(f"{url}/v1/heads", json=body, headers=auth(keys["department"]))
            assert r.status_code == 422 and message in r.json()["error"], (body["task"], message, r.text)
    assert not [e for e in home.registry.audit() if e.action == "head_request"]


# --- API keys (item 10; file mode from the key-file issue) -----------------------------------------


def test_a_corrupt_key_file_refuses_every_request_the_same_way_and_says_why_once(site_home, caplog):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=h).status_code == 200
        time.sleep(1.1)  # past the key cache's one-second refresh
        (home.path / "api_keys.json").write_text('{"keys": [{"id": ')
        with caplog.at_level(logging.INFO, logger="fedmeta.serving"):
            answers = []
            deadline = time.time() + 2.5  # spans two refreshes of the key cache
            while time.time() < deadline:
                r = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=h)
                answers.append((r.status_code, r.json()["error"]))
                time.sleep(0.05)
    assert set(answers) == {(503, "the server's API key file is unreadable; the operator must fix or recreate it")}
    lines = [r.getMessage() for r in caplog.records if "key_file_unreadable" in r.getMessage()]
    assert len(lines) == 1 and json.loads(lines[0])["effect"] == "every request is refused with 503"


def test_the_key_file_is_private_and_a_readable_one_is_warned_about(site_home, caplog):
    home, keys = site_home
    path = home.path / "api_keys.json"
    assert path.stat().st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    with caplog.at_level(logging.INFO, logger="fedmeta.serving"), running(settings(home)) as (url, _):
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).status_code == 200
    warnings = [json.loads(r.getMessage()) for r in caplog.records if "key_file_permissions" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0]["mode"] == "0o644" and "chmod 600" in warnings[0]["hint"]


# --- offline docs (item 10) ---------------------------------------------------------------------------


def test_no_page_loads_assets_from_the_internet_by_default(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        assert httpx.get(f"{url}/docs", headers=auth(keys["predict"])).status_code == 404
        assert httpx.get(f"{url}/redoc", headers=auth(keys["predict"])).status_code == 404
        spec = httpx.get(f"{url}/openapi.json", headers=auth(keys["predict"]))
    assert spec.status_code == 200 and "cdn." not in spec.text


def test_an_output_that_is_not_finite_is_a_422_naming_the_row_never_a_200_with_nulls(site_home, monkeypatch):
    """Item 4: a NaN output was served as a 200 with null predictions."""
    import numpy as np

    home, keys = site_home
    with running(settings(home)) as (url, app):
        store = app.state.fedmeta.store
        current = store.current

        class Overflowing:
            def run(self, tasks, feed):
                outputs = current.session.run(tasks, feed)
                for out in outputs:
                    out[1] = np.nan  # the second row's outputs
                return outputs

        monkeypatch.setattr(store, "current", type(current)(current.version, current.manifest, Overflowing(), current.validator, current.site))
        r = httpx.post(f"{url}/v1/predict", json={"rows": [ROW, ROW]}, headers=auth(keys["predict"]))
        v2 = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": _v2_inputs([ROW, ROW])}, headers=auth(keys["predict"]))
    assert r.status_code == 422 and r.json()["error"].startswith("rows[1]: the model's 'readmission_30d' output is not a finite number"), r.text
    assert v2.status_code == 400 and v2.json()["error"].startswith("inputs: row 1: the model's"), v2.text
