"""The console as a coordinator uses it: a real `fedmeta console`, a real training run, Debian's Chromium driven by Playwright.

Signed in with a coordinator key, the test launches a run from the page, watches
its round advance without a reload, sees every site and a drawn chart, stops it
from the page (a checkpoint, then "stopped" and a resume button), resumes it past
the round it stopped at and stops it again, and checks that the page logged no
error and asked nothing of any host but the console.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from playwright import sync_api as playwright

from serving.auth import KeyStore
from tests.site_server import free_port

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
if not shutil.which(CHROMIUM):
    pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)", pytrace=False)

RUN_CONFIG = """rounds = 300

[federation]
kind = "hospitals"
n_sites = 4

[model]
hidden = [16]

[local]
steps = 3

[evaluation]
every = 1
"""


@pytest.fixture
def console(tmp_path):
    home, runs = tmp_path / "home", tmp_path / "runs"
    home.mkdir()
    store = KeyStore(home)
    keys = {role: store.create(role, role)[1] for role in ("viewer", "coordinator")}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmeta.cli", "console", "--runs", str(runs), "--site-home", str(home), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(base + "/", timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "the console never answered"
            time.sleep(0.2)
    try:
        yield base, keys, runs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for run in runs.glob("*/.lock"):  # a run the test left behind: stop its whole group
            pid = _holder_pid(run)
            if pid:
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _holder_pid(lock) -> int | None:
    import json

    try:
        return int(json.loads(lock.read_text() or "{}").get("pid"))
    except (ValueError, TypeError):
        return None


def test_a_coordinator_launches_watches_and_stops_a_run_from_the_page(console, tmp_path):
    base, keys, runs = console
    outside, errors = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: r.url.startswith(base) or outside.append(r.url))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(base + "/launch")
            page.wait_for_url("**/signin?next=%2Flaunch")
            page.fill("#key", keys["coordinator"])
            page.click("button[type=submit]")
            page.wait_for_selector("#config")
            page.fill("#name", "trial")
            page.fill("#config", RUN_CONFIG)
            page.click("#launch")
            page.wait_for_url("**/runs/trial")
            page.evaluate("window.notReloaded = true")

            page.wait_for_function("() => Number(document.querySelector('#round')?.dataset.round) >= 1", timeout=180_000)
            first = int(page.get_attribute("#round", "data-round"))
            page.wait_for_function(f"() => Number(document.querySelector('#round').dataset.round) > {first}", timeout=15_000)
            assert page.evaluate("window.notReloaded") is True, "the round advanced without a reload"

            page.wait_for_function("() => document.querySelectorAll('#sites tbody tr').length === 4", timeout=30_000)
            sites = page.eval_on_selector_all("#sites tbody tr", "rows => rows.map(r => r.dataset.site)")
            assert sites == [f"hospital_{i:03d}" for i in range(4)]
            page.wait_for_function("() => [...document.querySelectorAll('[data-chart] polyline')].some(l => l.getAttribute('points').split(' ').length >= 2)")
            assert page.locator("[data-chart='Training loss'] polyline").count() == 1

            listed = httpx.get(base + "/api/runs", headers={"X-API-Key": keys["viewer"]}).json()["runs"]
            assert [(r["name"], r["status"]) for r in listed] == [("trial", "running")]
            assert httpx.get(base + "/api/runs").status_code == 401

            page.click("#stop")
            page.wait_for_selector("[data-status=stopped]", timeout=120_000)
            page.wait_for_selector("#resume")
            assert (runs / "trial" / "checkpoint.pt").exists() and not (runs / "trial" / "base_model.pt").exists()
            assert "stopped after round" in (runs / "trial" / "console.log").read_text()
            stopped_at = int(page.get_attribute("#round", "data-round"))

            page.click("#resume")
            page.wait_for_function(f"() => Number(document.querySelector('#round').dataset.round) > {stopped_at}", timeout=180_000)
            page.click("#stop")
            page.wait_for_selector("[data-status=stopped]", timeout=120_000)
            assert page.evaluate("window.notReloaded") is True
        finally:
            page.screenshot(path=str(tmp_path / "run-page.png"), full_page=True)
            browser.close()
    assert errors == [], errors
    assert outside == [], outside
