"""What is served follows the registry, and nothing that touches the registry or model files blocks predictions."""

import sqlite3
import threading
import time

import httpx

from fedmeta.registry import SiteHome, SQLiteRegistry
from site_server import ROW, SITE, auth, running, settings, site_home  # noqa: F401


def _versions_while(url: str, key: str, action) -> list[str]:
    """The served versions seen by a client predicting in a loop while ``action`` runs, consecutive repeats folded."""
    seen, stop = [], threading.Event()

    def client():
        with httpx.Client(headers=auth(key), timeout=30) as http:
            while not stop.is_set():
                version = http.post(f"{url}/v1/predict", json={"row": ROW}).json()["model"]["version"]
                if not seen or seen[-1] != version:
                    seen.append(version)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(0.3)
        action()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(timeout=30)
    return seen


def test_promote_never_swaps_back_while_the_reload_loop_runs(site_home, monkeypatch):
    """Item 9: the registry is written before anything is served, so the reload loop never sees a disagreement."""
    home, keys = site_home
    original = SQLiteRegistry.current

    def slow_current(self, site):
        promoted = original(self, site)
        time.sleep(0.2)  # a slow registry read: the reload loop holds what it read for a while
        return promoted

    monkeypatch.setattr(SQLiteRegistry, "current", slow_current)
    with running(settings(home, reload_interval=0.02)) as (url, _):
        def promote():
            assert httpx.post(f"{url}/v1/models/v3/promote", headers=auth(keys["admin"]), timeout=30).status_code == 200

        seen = _versions_while(url, keys["predict"], promote)
    assert seen == ["v2", "v3"]


def test_predictions_are_answered_while_a_promote_waits_for_the_registry_lock(site_home):
    """Item 6: a registry write lock held elsewhere delays only the promote, never predictions."""
    home, keys = site_home
    lock = sqlite3.connect(home.path / "registry.sqlite", isolation_level=None, timeout=1)
    with running(settings(home, registry_timeout=30)) as (url, _):
        h = auth(keys["predict"])
        with httpx.Client(headers=h, timeout=60) as http:
            control = [http.post(f"{url}/v1/predict", json={"row": ROW}).status_code for _ in range(20)]
        lock.execute("BEGIN IMMEDIATE")  # another writer holds the registry
        promote_result = {}
        promoter = threading.Thread(target=lambda: promote_result.update(r=httpx.post(f"{url}/v1/models/v3/promote", headers=auth(keys["admin"]), timeout=60)))
        promoter.start()
        try:
            time.sleep(1.0)  # the promote is now waiting for the lock
            answered = []
            with httpx.Client(headers=h, timeout=60) as http:
                for _ in range(20):
                    answered.append(http.post(f"{url}/v1/predict", json={"row": ROW}).status_code)
            answered_while_locked = promoter.is_alive()
        finally:
            lock.execute("ROLLBACK")
            lock.close()
            promoter.join(timeout=60)
        served_after = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=h).json()["model"]["version"]
    assert control == [200] * 20 and answered == [200] * 20
    assert answered_while_locked, "predictions waited for the registry lock"
    assert promote_result["r"].status_code == 200 and served_after == "v3"


def test_a_registry_locked_past_the_timeout_is_a_503_not_a_hang(site_home):
    home, keys = site_home
    lock = sqlite3.connect(home.path / "registry.sqlite", isolation_level=None, timeout=1)
    with running(settings(home, registry_timeout=0.5)) as (url, _):
        lock.execute("BEGIN IMMEDIATE")
        try:
            r = httpx.post(f"{url}/v1/models/v3/promote", headers=auth(keys["admin"]), timeout=60)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert r.status_code == 503 and "registry is busy" in r.json()["error"] and r.headers["retry-after"]
        assert httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"] == "v2"
    assert home.registry.current(SITE).version == 2


def test_predictions_are_answered_while_a_promoted_model_loads(site_home, monkeypatch):
    """Item 6: loading and verifying a model happens off the event loop (before: 5,900 -> 458 req/s during swaps)."""
    home, keys = site_home
    loading, release = threading.Event(), threading.Event()
    original = SiteHome.load

    def slow_load(self, version, name=None):
        if getattr(version, "version", version) == 3:
            loading.set()
            release.wait(30)  # a large model: reading and hashing it takes a while
        return original(self, version, name)

    monkeypatch.setattr(SiteHome, "load", slow_load)
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        result = {}
        promoter = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}/v1/models/v3/promote", headers=auth(keys["admin"]), timeout=60)))
        promoter.start()
        try:
            assert loading.wait(30)
            with httpx.Client(headers=h, timeout=60) as http:
                answered = [http.post(f"{url}/v1/predict", json={"row": ROW}).json()["model"]["version"] for _ in range(20)]
            answered_while_loading = not release.is_set()
        finally:
            release.set()
            promoter.join(timeout=60)
        served_after = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=h).json()["model"]["version"]
    assert answered_while_loading and answered == ["v2"] * 20
    assert result["r"].status_code == 200 and served_after == "v3"


def test_a_promotion_forged_while_serving_is_not_taken(site_home):
    home, keys = site_home
    with running(settings(home, reload_interval=0.05)) as (url, _):
        forger = sqlite3.connect(home.path / "registry.sqlite", isolation_level=None)
        forger.execute("INSERT INTO promotions (site, version, previous, at, actor) VALUES (?, 3, 1, 'now', 'mallory')", (SITE,))
        forger.close()
        assert home.registry.current(SITE).version == 3  # the registry now names v3, with no audit entry for it
        time.sleep(0.6)  # a dozen reload intervals
        served = httpx.post(f"{url}/v1/predict", json={"row": ROW}, headers=auth(keys["predict"])).json()["model"]["version"]
    assert served == "v2"
