"""Head jobs: a department registers, an admin promotes; no non-finite model is registered; shutdown cancels a job."""

import time

import httpx
import pytest

from serving.auth import KeyStore
from site_server import ROW, SITE, auth, running, sepsis_rows, settings, site_home, wait_for_job  # noqa: F401


def test_a_department_key_cannot_replace_what_is_served(site_home):
    """Item 3: promote: true from a department key is refused before a job exists."""
    home, keys = site_home
    rows = [{**{k: v for k, v in r.items() if k != "sepsis"}, "died_in_hospital": 1 if r["sepsis"] == "yes" else 0} for r in sepsis_rows(80)]
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json={"task": "mortality", "rows": rows, "promote": True}, headers=auth(keys["department"]))
        assert r.status_code == 403 and r.json()["error"].startswith("promote: promotion is the admin's"), r.text
    assert home.registry.current(SITE).version == 2
    assert not [e for e in home.registry.audit() if e.action == "head_request"]


@pytest.mark.slow
def test_a_department_job_registers_a_version_that_an_admin_promotes(site_home):
    home, keys = site_home
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "kind": "binary", "rows": sepsis_rows(), "steps": 20}, headers=auth(keys["department"]))
        assert r.status_code == 202, r.text
        job = wait_for_job(url, r.json()["status_url"], keys["department"])
        assert job["status"] == "succeeded" and job["version"] == "v4" and not job["promoted"], job
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"] == "v2"
        assert httpx.post(f"{url}/v1/models/v4/promote", headers=auth(keys["admin"])).status_code == 200
        served = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()
    assert served["model"]["version"] == "v4" and "sepsis" in served["predictions"]


@pytest.mark.slow
def test_a_site_policy_can_let_departments_promote_their_heads(site_home):
    home, keys = site_home
    (home.path / "serving-policy.toml").write_text("[heads]\ndepartment_may_promote = true\n")
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "kind": "binary", "rows": sepsis_rows(), "steps": 20, "promote": True},
                       headers=auth(keys["department"]))
        assert r.status_code == 202, r.text
        job = wait_for_job(url, r.json()["status_url"], keys["department"])
        served = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"]
    assert job["status"] == "succeeded" and job["promoted"] and served == job["version"] == "v4"


def test_a_head_whose_outputs_are_not_finite_is_never_registered(site_home, monkeypatch):
    """Item 4: the job runs the new model on its rows before registering it."""
    import fedmeta.personalize as personalize
    from serving import head_worker
    from serving.heads import HeadRequest, check_head_request
    from serving.store import ModelStore

    home, _ = site_home
    original = personalize.train_head

    def diverged(*args, **kwargs):
        result = original(*args, **kwargs)
        for name, value in result.model.params.items():
            if name.startswith("heads.sepsis"):
                value.fill_(float("inf"))  # what labels of +-1e308 did to the head
        return result

    monkeypatch.setattr(personalize, "train_head", diverged)
    store = ModelStore(home, SITE, 1024)
    request = HeadRequest(task="sepsis", kind="binary", rows=sepsis_rows(), steps=5)
    plan = check_head_request(store.current, request)
    spec = {"id": "job1", "site_home": str(home.path), "site": SITE, "parent": 2, "request": request.model_dump(mode="json"), "plan": plan,
            "promote": False, "actor": "key:department-app", "personalized": []}
    versions_before = len(home.registry.versions())
    result = head_worker._run(spec)
    assert result == {"status": "failed", "error": head_worker.FAILED_NOT_FINITE}
    assert len(home.registry.versions()) == versions_before


def test_shutdown_cancels_a_running_head_job_and_says_so(site_home, caplog):
    """Item 7: stopping the server does not wait for a head job; the job's status and the log say it was cancelled."""
    import logging

    home, keys = site_home
    with caplog.at_level(logging.INFO, logger="fedmeta.serving"):
        with running(settings(home)) as (url, app):
            r = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "kind": "binary", "rows": sepsis_rows(4000), "steps": 5000, "tune_body": True},
                           headers=auth(keys["department"]))
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]
            deadline = time.time() + 60
            while app.state.fedmeta.jobs.get(job_id).status == "queued":
                assert time.time() < deadline
                time.sleep(0.1)
            time.sleep(1.0)
        job = app.state.fedmeta.jobs.get(job_id)
    assert job.status == "cancelled" and "the server shut down" in job.error, job
    assert len(home.registry.versions()) == 3  # nothing was registered
    assert any('"event": "head_job_cancelled"' in r.getMessage() for r in caplog.records)
    assert [e.detail["job"] for e in home.registry.audit() if e.action == "head_cancelled"] == [job_id]


def test_a_head_job_is_visible_only_to_the_key_that_asked_for_it_and_to_admins(site_home):
    """Issue 23, defect 6: another department's key gets the answer an unknown id gets, so job ids cannot be probed."""
    home, keys = site_home
    oncology = KeyStore(home.path).create("oncology-app", "department")[1]
    body = {"task": "sepsis", "kind": "binary", "rows": sepsis_rows(), "steps": 5000}
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json=body, headers=auth(keys["department"]))
        assert r.status_code == 202, r.text
        job_id, job_url = r.json()["job"], r.json()["status_url"]
        by_other = httpx.get(url + job_url, headers=auth(oncology))
        unknown = httpx.get(f"{url}/v1/heads/jobs/{job_id[::-1]}", headers=auth(oncology))
        conflict = httpx.post(f"{url}/v1/heads", json=body, headers=auth(oncology))  # the same task while the job is queued or running
        by_owner = httpx.get(url + job_url, headers=auth(keys["department"]))
        by_admin = httpx.get(url + job_url, headers=auth(keys["admin"]))
    assert unknown.status_code == 404 and unknown.json()["error"] == f"no head job {job_id[::-1]!r}"
    assert by_other.status_code == 404 and by_other.json()["error"] == f"no head job {job_id!r}", by_other.text
    assert conflict.status_code == 409 and job_id not in conflict.text, conflict.text
    assert by_owner.status_code == by_admin.status_code == 200 and by_owner.json()["id"] == by_admin.json()["id"] == job_id


def test_a_serving_only_install_answers_a_head_request_with_501_naming_the_training_extra(site_home, monkeypatch):
    import serving.heads

    home, keys = site_home
    monkeypatch.setattr(serving.heads, "training_installed", lambda: False)
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "kind": "binary", "rows": sepsis_rows(), "steps": 20}, headers=auth(keys["department"]))
        unauthenticated = httpx.post(f"{url}/v1/heads", json={"task": "sepsis", "rows": sepsis_rows()})
    assert r.status_code == 501 and 'pip install "fedmeta[train]"' in r.json()["error"], r.text
    assert unauthenticated.status_code == 401  # the key is checked first: no install detail for strangers
    assert not [e for e in home.registry.audit() if e.action == "head_request"]
