"""The OpenAPI document and the docs page: behind a key like every other route, and silent about the federation's statistics.

Issue 23, defect 3: ``/openapi.json`` was open and bounded each numeric
feature by mean +- 1e6 std, from which anyone recovered the un-noised
normalization statistics exactly.
"""

import json
import math
import re

import httpx

from site_server import PATH_VALUES, auth, running, served_routes, settings, site_home  # noqa: F401

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def statistics(model) -> dict[str, float]:
    """Each numeric feature's mean and std, and the bounds mean +- 1e6 std they would give, by a name saying which."""
    out = {}
    for f in model.manifest.schema_["features"]:
        if f.get("type", "numeric") == "numeric":
            name, mean, std = f["name"], float(f["mean"]), float(f["std"])
            out |= {f"{name}.mean": mean, f"{name}.std": std, f"{name}.lower": mean - 1e6 * std, f"{name}.upper": mean + 1e6 * std}
    return out


def revealed(text: str, stats: dict[str, float]) -> list[str]:
    """The statistics some number in ``text`` lies within 1e-3 of."""
    numbers = [float(n) for n in NUMBER.findall(text)]
    return sorted(name for name, value in stats.items() if any(abs(x - value) <= 1e-3 for x in numbers))


def test_every_route_but_the_health_probes_needs_a_key_the_document_and_the_docs_page_included(site_home):
    home, keys = site_home
    with running(settings(home, docs=True)) as (url, app):
        routes = served_routes(app)
        assert {"GET /openapi.json", "GET /docs", "GET /v1/heads/jobs/{job_id}"} <= routes  # the routes under test exist
        for method, path in sorted(r.split(" ") for r in routes - {"GET /v2/health/live", "GET /v2/health/ready"}):
            r = httpx.request(method, url + path.format(**PATH_VALUES), json={})
            assert r.status_code == 401 and "missing API key" in r.json()["error"], (method, path, r.status_code)
        assert httpx.get(f"{url}/v2/health/live").status_code == httpx.get(f"{url}/v2/health/ready").status_code == 200
        for path in ("/openapi.json", "/docs"):
            assert httpx.get(url + path, headers=auth(keys["predict"])).status_code == 200, path


def test_neither_the_document_nor_the_docs_page_states_the_federations_statistics(site_home):
    home, keys = site_home
    with running(settings(home, docs=True)) as (url, app):
        document = httpx.get(f"{url}/openapi.json", headers=auth(keys["predict"]))
        page = httpx.get(f"{url}/docs", headers=auth(keys["predict"]))
        model = app.state.fedmeta.store.current
    stats = statistics(model)
    # Control: the statistics are real, the server enforces the bounds built from them, and the scan finds them where they are.
    assert stats and all(abs(v) > 1e-3 for v in stats.values())
    for f in model.validator.numeric:  # the enforced bounds hold mean +- 1e6 std and are a power of ten, which the document may state
        lo, hi = model.validator.ranges[f]
        assert lo <= stats[f"{f}.lower"] and stats[f"{f}.upper"] <= hi and -lo == hi == 10 ** round(math.log10(hi))
    assert revealed(json.dumps(model.manifest.schema_), stats) == sorted(n for n in stats if n.endswith((".mean", ".std")))
    assert document.status_code == page.status_code == 200
    assert json.loads(document.text)["paths"]["/v1/predict"] and '"/v1/predict"' in page.text  # the full document, inlined in the page
    assert revealed(document.text, stats) == [] and revealed(page.text, stats) == []
