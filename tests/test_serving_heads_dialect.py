"""``POST /v1/heads`` reads a department's rows in the site's own dialect through the promoted model's recorded mapping.

Issue 26, item 3: the rows are read as ``/v1/predict`` reads them (:mod:`serving.dialect`), a new task's label passes
under its own name, and the version the job registers records the mapping, as ``fedmeta heads add`` does.
"""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest

from fedmeta.data.mapping import Mapping
from fedmeta.personalize import load_trained
from fedmeta.registry import parse_version
from serving import head_worker
from serving.auth import KeyStore
from serving.errors import ApiError
from serving.heads import HeadRequest, check_head_request
from serving.store import ModelStore
from site_server import auth, running, settings, wait_for_job
from test_serving_dialect import SITE, heart, personalized_home  # noqa: F401  (heart: the fixture personalized_home reads)

TASK = "followup"


def followup(canonical: pd.DataFrame) -> list[str]:
    """A new task's labels, which no mapping names: follow up the patients with high cholesterol."""
    return ["yes" if chol > 225 else "no" for chol in canonical["chol"]]


@pytest.fixture(scope="module")
def department_rows(heart):  # noqa: F811
    """The same patients with the new task's label, as the department's app sends them: (schema's dialect, site's dialect)."""
    canonical = pd.read_csv(heart / "canonical" / SITE / "train.csv")
    site = pd.read_csv(heart / "dialect" / SITE / "train.csv")
    schema_rows = canonical.drop(columns="target").assign(sex=canonical["sex"].astype(str), **{TASK: followup(canonical)}).to_dict("records")
    site_rows = site.drop(columns="HeartDisease").assign(**{TASK: followup(canonical)}).to_dict("records")
    assert "Cholesterol_mmol_L" in site_rows[0] and "chol" not in site_rows[0]
    return schema_rows, site_rows


@pytest.fixture(scope="module")
def mapped_home(heart, tmp_path_factory):  # noqa: F811
    """st-marys' site home, its promoted model personalized through its mapping; a department key."""
    home, _ = personalized_home(heart, "dialect", tmp_path_factory.mktemp("home-heads"))
    return home, KeyStore(home.path).create("cardiology", "department")[1]


def run_job(home, rows: list[dict], job: str):
    """A head job on ``rows`` as the server runs one (checked, then trained in the worker); the version it registered."""
    model = ModelStore(home, SITE, 1024).current
    request = HeadRequest(task=TASK, kind="binary", rows=rows, steps=30)
    plan = check_head_request(model, request)
    spec = {"id": job, "site_home": str(home.path), "site": SITE, "parent": model.version.version, "request": request.model_dump(mode="json"),
            "plan": plan, "promote": False, "actor": "key:cardiology", "personalized": []}
    result = head_worker._run(spec)
    assert result["status"] == "succeeded", result
    return home.registry.get(parse_version(result["version"]))


@pytest.fixture(scope="module")
def twin_heads(mapped_home, department_rows):
    """The head trained from the schema's rows and the head trained from the same rows in the site's dialect."""
    home, _ = mapped_home
    schema_rows, site_rows = department_rows
    return home, run_job(home, schema_rows, "schema1"), run_job(home, site_rows, "site1")


def test_site_rows_train_the_head_the_same_rows_in_the_schemas_dialect_train(twin_heads):
    home, from_schema, from_site = twin_heads
    a, b = load_trained(home, from_schema).params, load_trained(home, from_site).params
    head = [name for name in a if name.startswith(f"heads.{TASK}.")]
    assert head
    for name in head:
        # mmol/L x 38.67 is the mg/dL value up to float64 rounding; the model computes in float32.
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_version_a_head_job_registers_records_the_mapping_its_rows_were_read_with(twin_heads):
    home, _, from_site = twin_heads
    parent = home.registry.get(from_site.parent)
    manifest, recorded = home.load(from_site)[0], home.load(parent)[0].mapping
    assert recorded is not None and manifest.mapping == recorded
    assert manifest.data["mapping_sha256"] == Mapping.model_validate(recorded).digest()


def test_a_known_tasks_label_sent_under_its_site_column_is_recoded_as_heads_add_reads_it(mapped_home, heart):  # noqa: F811
    home, _ = mapped_home
    site = pd.read_csv(heart / "dialect" / SITE / "train.csv").to_dict("records")  # HeartDisease: yes/no, the label of task disease
    canonical = pd.read_csv(heart / "canonical" / SITE / "train.csv")
    plan = check_head_request(ModelStore(home, SITE, 1024).current, HeadRequest(task="disease", rows=site, steps=5))
    expected = [None if np.isnan(t) else str(int(t)) for t in canonical["target"]]
    assert [row["target"] for row in plan["rows"]] == expected
    assert all("HeartDisease" not in row for row in plan["rows"])


def test_a_site_rows_new_label_that_does_not_fit_the_task_is_a_422_without_its_value(mapped_home, department_rows):
    home, _ = mapped_home
    rows = [{**row, TASK: 1.5} for row in department_rows[1]]
    with pytest.raises(ApiError) as refused:
        check_head_request(ModelStore(home, SITE, 1024).current, HeadRequest(task=TASK, kind="binary", rows=rows))
    assert refused.value.status == 422
    assert refused.value.message == f"rows[0].{TASK}: expected a class value (string or integer)"


def test_a_site_code_the_mapping_lacks_is_a_422_naming_the_column_never_the_value(mapped_home, department_rows):
    home, key = mapped_home
    rows = [dict(row) for row in department_rows[1]]
    rows[5]["Sex"] = "Q7"
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json={"task": TASK, "kind": "binary", "rows": rows, "steps": 5}, headers=auth(key))
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert message.startswith("rows: column 'Sex' (feature 'sex'): 1 site value(s) have no schema value") and "\n" not in message
    assert "Q7" not in message
    assert not [e for e in home.registry.audit() if e.action == "head_request"]


@pytest.mark.slow
def test_a_head_request_in_the_site_dialect_runs_through_the_server_to_a_version_recording_the_mapping(mapped_home, department_rows):
    home, key = mapped_home
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json={"task": TASK, "kind": "binary", "rows": department_rows[1], "steps": 10}, headers=auth(key))
        assert r.status_code == 202, r.text
        job = wait_for_job(url, r.json()["status_url"], key)
    assert job["status"] == "succeeded", job
    assert "mapping_sha256" in home.load(home.registry.get(parse_version(job["version"])))[0].data


def test_a_label_that_is_a_site_column_of_the_mapping_is_a_422_naming_it(mapped_home, department_rows):
    home, _ = mapped_home
    with pytest.raises(ApiError) as refused:
        check_head_request(ModelStore(home, SITE, 1024).current, HeadRequest(task=TASK, kind="binary", label="Sex", rows=department_rows[1]))
    assert refused.value.status == 422
    assert refused.value.message == "label: 'Sex' is a site column of the model's mapping (mapped to 'sex'); a label column needs a name of its own"
