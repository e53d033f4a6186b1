"""The console's JSON API over run folders laid out by hand: keys and roles, statuses, series, sites, and refused launches.

The browser tests (tests/test_console_browser.py) drive the pages over a real run.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
from fastapi.testclient import TestClient

from fedmeta.console.app import create_app
from serving.auth import KeyStore
from serving.errors import ApiError

CONFIG = 'rounds = 5\n\n[federation]\nkind = "hospitals"\nn_sites = 3\n\n[privacy]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n'


def write_run(folder, rounds_done: int, rounds: int = 5, base: bool = False, checkpoint: bool = True, holder: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(CONFIG.replace("rounds = 5", f"rounds = {rounds}"))
    rows = []
    for r in range(1, rounds_done + 1):
        for site, n in (("clinic-a", 100), ("clinic-b", 40)):
            rows.append({"round": r, "phase": "train", "site": site, "loss": 1.0 / r, "seconds": 0.5, "examples.mortality": n, "examples": n})
        rows.append({"round": r, "phase": "train", "site": "*", "loss": 1.0 / r, "seconds": 2.0, "elapsed": 2.0 * r, "epsilon": 0.5 * r, "delta": 1e-5})
        rows.append({"round": r - 1, "phase": "evaluate", "site": "*", "mortality.global.acc": 0.6 + r / 100, "mortality.personalized.acc": 0.7 + r / 100})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "sites.json").write_text(json.dumps({"sites": {
        "clinic-a": {"status": "replied", "last_contact": "2026-12-05T10:00:00Z", "last_round": rounds_done, "missed": {}, "mapping": None},
        "clinic-b": {"status": "failed", "last_contact": "2026-12-05T10:00:00Z", "last_round": rounds_done, "missed": {"2": "ValueError: column age"}, "mapping": None},
    }}))
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"x")
    if base:
        (folder / "base_model.pt").write_bytes(b"x" * 2048)
    if holder is not None:
        (folder / ".lock").write_text(json.dumps(holder))
    return folder


@pytest.fixture
def console(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    store = KeyStore(home)
    keys = {role: store.create(f"{role}-key", role)[1] for role in ("viewer", "coordinator", "admin")}
    runs = tmp_path / "runs"
    write_run(runs / "finished", 5, base=True)
    write_run(runs / "stopped", 2)
    write_run(runs / "live", 3, holder={"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "engine": "simulation"})
    write_run(runs / "crashed", 1, holder={"pid": 2**22 + 12345, "host": socket.gethostname()})  # its holder's pid is gone
    (runs / "not-a-run").mkdir()
    client = TestClient(create_app(runs, home))
    return client, keys, runs


def get(client, path, key):
    return client.get(path, headers={"X-API-Key": key} if key else {})


def test_without_a_key_the_api_answers_401_and_the_pages_hold_no_data(console):
    client, keys, _ = console
    for path in ("/api/runs", "/api/runs/finished", "/api/runs/finished/metrics", "/openapi.json", "/api/whoami"):
        assert get(client, path, None).status_code == 401, path
    assert client.post("/api/runs", json={"name": "x", "config": CONFIG}).status_code == 401
    assert get(client, "/api/runs", "fm_not-a-key").status_code == 401
    page = client.get("/runs/finished")
    assert page.status_code == 200 and "clinic-a" not in page.text and "/assets/console.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_a_viewer_sees_every_run_with_its_status_round_and_privacy_spent(console):
    client, keys, _ = console
    runs = {r["name"]: r for r in get(client, "/api/runs", keys["viewer"]).json()["runs"]}
    assert set(runs) == {"finished", "stopped", "live", "crashed"}, "folders without a configuration are not runs"
    assert {name: r["status"] for name, r in runs.items()} == {"finished": "finished", "stopped": "stopped", "live": "running", "crashed": "stopped"}
    live = runs["live"]
    assert (live["round"], live["rounds"], live["elapsed"]) == (3, 5, 6.0)
    assert live["seconds_left"] == pytest.approx(2 * 2.0), "two rounds to go at 2 s each"
    assert runs["finished"]["epsilon"] == 2.5 and runs["finished"]["protections"]["dp"] is True
    assert get(client, "/api/whoami", keys["viewer"]).json() == {"name": "viewer-key", "role": "viewer"}


def test_a_run_gives_its_sites_account_events_models_and_series(console):
    client, keys, _ = console
    run = get(client, "/api/runs/finished", keys["viewer"]).json()
    sites = {s["site"]: s for s in run["sites"]}
    assert sites["clinic-a"]["rows"] == {"mortality": 100} and sites["clinic-a"]["rounds"] == 5 and sites["clinic-a"]["seconds"] == 0.5
    assert sites["clinic-b"]["failures"] == 1 and sites["clinic-b"]["last_failure"] == "ValueError: column age"
    assert run["account"]["epsilon"] == 2.5 and run["account"]["delta"] == 1e-5
    assert {"round": 2, "site": "clinic-b", "event": "ValueError: column age"} in run["events"]
    assert [m["level"] for m in run["models"]] == ["global"] and run["models"][0]["round"] == 5
    series = get(client, "/api/runs/finished/metrics", keys["viewer"]).json()
    assert series["train"]["round"] == [1, 2, 3, 4, 5] and series["train"]["loss"][-1] == pytest.approx(0.2)
    assert series["evaluation"]["mortality.personalized.acc"][-1] == pytest.approx(0.75)
    later = get(client, "/api/runs/finished/metrics?since=3", keys["viewer"]).json()
    assert later["train"]["round"] == [4, 5] and later["evaluation"]["round"] == [4]


def test_the_series_follow_a_file_that_grows_and_one_that_a_resume_truncates(console):
    client, keys, runs = console
    path = runs / "stopped" / "metrics.jsonl"
    assert get(client, "/api/runs/stopped/metrics", keys["viewer"]).json()["train"]["round"] == [1, 2]
    with path.open("a") as f:
        f.write(json.dumps({"round": 3, "phase": "train", "site": "*", "loss": 0.3}) + "\n" + '{"round": 4, "pha')  # a line being written
    assert get(client, "/api/runs/stopped/metrics", keys["viewer"]).json()["train"]["round"] == [1, 2, 3]
    lines = path.read_text().splitlines()[:3]
    path.write_text("\n".join(lines) + "\n")  # a resume cuts the rows after its checkpoint
    assert get(client, "/api/runs/stopped/metrics", keys["viewer"]).json()["train"]["round"] == [1]



def test_the_sites_table_follows_a_file_that_grows_and_skips_lines_that_are_not_rows(console):
    client, keys, runs = console
    sites = {s["site"]: s for s in get(client, "/api/runs/stopped", keys["viewer"]).json()["sites"]}
    assert (sites["clinic-a"]["rounds"], sites["clinic-a"]["seconds"]) == (2, 0.5)
    with (runs / "stopped" / "metrics.jsonl").open("a") as f:
        for row in ({"round": 3, "phase": "train", "site": "clinic-a", "seconds": 2.0, "examples.mortality": 120}, [1, 2], "text",
                    {"round": 3, "phase": "evaluate", "site": "clinic-a", "seconds": 99.0}):
            f.write(json.dumps(row) + "\n")
    sites = {s["site"]: s for s in get(client, "/api/runs/stopped", keys["viewer"]).json()["sites"]}
    assert sites["clinic-a"]["rounds"] == 3 and sites["clinic-a"]["seconds"] == pytest.approx((0.5 + 0.5 + 2.0) / 3)
    assert sites["clinic-a"]["rows"] == {"mortality": 120}, "the rows of its last training reply"
    assert sites["clinic-b"]["rounds"] == 2

def test_roles_are_kept_apart_a_viewer_cannot_launch_and_a_serving_admin_key_opens_nothing_here(console):
    client, keys, _ = console
    refused = client.post("/api/runs", json={"name": "new", "config": CONFIG}, headers={"X-API-Key": keys["viewer"]})
    assert refused.status_code == 403 and "coordinator" in refused.json()["error"]
    assert get(client, "/api/runs", keys["admin"]).status_code == 403
    store = KeyStore(client.app.state.supervisor.runs.parent / "home")
    with pytest.raises(ApiError) as e:
        store.authorize([(b"x-api-key", keys["coordinator"].encode())], "predict")
    assert e.value.status == 403, "a console key opens no route of the site's prediction server"


def test_a_launch_is_checked_as_fedmeta_train_checks_it_and_names_the_problem(console):
    client, keys, runs = console
    post = lambda body: client.post("/api/runs", json=body, headers={"X-API-Key": keys["coordinator"]})  # noqa: E731
    bad_field = post({"name": "new", "config": CONFIG.replace("n_sites = 3", "n_sites = -2")})
    assert bad_field.status_code == 422 and "federation.n_sites" in bad_field.json()["error"]
    assert "TOML" in post({"name": "new", "config": "rounds = = 3"}).json()["error"]
    for name in ("../escape", "a/b", "", ".hidden", "x" * 65):
        answer = post({"name": name, "config": CONFIG})
        assert answer.status_code == 422 and "run name" in answer.json()["error"], name
    assert post({"name": "finished", "config": CONFIG}).status_code == 409
    assert sorted(p.name for p in runs.iterdir()) == ["crashed", "finished", "live", "not-a-run", "stopped"], "nothing refused left a folder"
    assert get(client, "/api/runs/..%2Ffinished", keys["viewer"]).status_code == 404


def test_stop_and_resume_refuse_runs_the_console_did_not_start(console):
    client, keys, _ = console
    headers = {"X-API-Key": keys["coordinator"]}
    stop = client.post("/api/runs/live/stop", headers=headers)
    assert stop.status_code == 409 and "not started by this console" in stop.json()["error"] and str(os.getpid()) in stop.json()["error"]
    assert client.post("/api/runs/live/resume", headers=headers).status_code == 409
    assert client.post("/api/runs/nothing/stop", headers=headers).status_code == 404


def test_the_openapi_document_lists_the_api_for_a_key_holder(console):
    client, keys, _ = console
    paths = get(client, "/openapi.json", keys["viewer"]).json()["paths"]
    assert {"/api/runs", "/api/runs/{name}", "/api/runs/{name}/metrics", "/api/runs/{name}/stop", "/api/runs/{name}/resume"} <= set(paths)
