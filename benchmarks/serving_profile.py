"""Where a 1-row prediction's microseconds go, in process: the whole app against its no-op route, then each piece alone.

The first table sends requests through the whole ASGI app (middleware, routing, auth, validation,
the batched onnxruntime call, the response), one at a time and eight at once (as ``asyncio.gather``:
the eight share one onnxruntime call, as under wrk at concurrency 8), and reports CPU microseconds per
request (thread time, so that a neighbour's load on a shared machine counts less) for the no-op liveness
route and for ``/v1/predict``, alternated round by round. The difference is what
``benchmarks/serving_load.py`` measures as a ratio, minus HTTP parsing, which both routes pay.
The second table times each piece of a prediction alone (best of 7).

    python benchmarks/serving_profile.py --site-home SITE_HOME [--rounds 9]

SITE_HOME is a site home with a promoted model (``benchmarks/serving_load.py`` builds one); a
``predict`` key named ``profile`` is created in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np

from serving.app import create_app
from serving.bodies import parse_json
from serving.errors import json_response
from serving.predict import render
from serving.settings import ServingSettings
from serving.store import Columns

ROW = {
    "age": 71, "sex": "F", "admission_type": "emergency", "ward": "cardiology", "prior_admissions": 2, "charlson_index": 4,
    "heart_rate": 96, "systolic_bp": 118, "creatinine": 1.4, "hemoglobin": 11.2, "sodium": 136, "wbc": 9.8,
}


def asgi_call(app, method: str, path: str, headers: list, body: bytes = b""):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8080), "state": {}}
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def call():
        status = []

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app({**scope, "state": {}}, receive, send)
        if status != [200]:
            raise SystemExit(f"{method} {path} answered {status}")

    return call


async def cpu_us_per_request(call, concurrency: int, requests: int) -> float:
    start = time.thread_time_ns()
    for _ in range(requests // concurrency):
        await asyncio.gather(*(call() for _ in range(concurrency)))
    return (time.thread_time_ns() - start) / (requests // concurrency * concurrency) / 1000


async def whole_app(app, key: str, rounds: int) -> dict[str, list[float]]:
    body = json.dumps({"row": ROW}).encode()
    live = asgi_call(app, "GET", "/v2/health/live", [(b"host", b"x")])
    predict = asgi_call(app, "POST", "/v1/predict", [(b"host", b"x"), (b"authorization", f"Bearer {key}".encode()),
                                                      (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body)
    cases = {"no-op, 1 at a time": (live, 1), "predict, 1 at a time": (predict, 1), "no-op, 8 at once": (live, 8), "predict, 8 at once": (predict, 8)}
    for call, concurrency in cases.values():  # warm-up
        await cpu_us_per_request(call, concurrency, 800)
    measured: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (call, concurrency) in cases.items():
            measured[name].append(await cpu_us_per_request(call, concurrency, 2000))
    return measured


def pieces(app, key: str) -> dict[str, float]:
    server = app.state.fedmeta
    model = server.store.current
    metrics = next(m.kwargs["metrics"] for m in app.user_middleware if "metrics" in m.kwargs)
    headers = [(b"host", b"x"), (b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
    body = json.dumps({"row": ROW}).encode()
    feed, _ = model.validator.columns([ROW], "row", strict=False)
    feeds = [model.validator.columns([ROW], "row", strict=False)[0] for _ in range(8)]
    joined = Columns.joined(feeds)
    outputs = model.run(model.tasks, feed)
    content = {"model": {"site": model.site, "version": model.label, "sha256": model.version.sha256}, "rows": 1,
               "predictions": render(model, model.tasks, outputs), "outside_training_range": [], "ignored_fields": []}
    timed = {
        "auth (key from the headers, SHA-256, lookup)": (lambda: server.keys.authorize(headers, "predict"), 20000),
        "parse the JSON body": (lambda: parse_json(body, 1000), 20000),
        "validate the row, build its columns": (lambda: model.validator.columns([ROW], "row", strict=False), 20000),
        "join 8 one-row feeds (per batch)": (lambda: Columns.joined(feeds), 5000),
        "onnxruntime, 1 row": (lambda: model.run(model.tasks, feed), 2000),
        "onnxruntime, 8 rows (per batch)": (lambda: model.run(model.tasks, joined), 2000),
        "training range, 8 rows (per batch)": (lambda: model.ranges is None or model.ranges.all_inside(joined, 8), 5000),
        "finite outputs (per batch)": (lambda: all(np.isfinite(out.sum()) for out in outputs), 20000),
        "render the predictions": (lambda: render(model, model.tasks, outputs), 20000),
        "ignored fields": (lambda: model.validator.ignored_fields([ROW]), 20000),
        "JSON response (predict)": (lambda: json_response(content), 20000),
        "JSON response (no-op)": (lambda: json_response({"live": True}), 20000),
        "metrics (predict, 200)": (lambda: metrics.observe("/v1/predict", "POST", 200, 0.0002, (model.tasks, 1, [])), 20000),
        "metrics (no-op, 200)": (lambda: metrics.observe("/v2/health/live", "GET", 200, 0.0002, None), 20000),
    }
    return {name: min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6 for name, (fn, number) in timed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-home", required=True)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    key = subprocess.run([sys.executable, "-m", "fedmeta.cli", "keys", "create", "--role", "predict", "--name", "profile", "--site-home", args.site_home],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    app = create_app(ServingSettings(site_home=Path(args.site_home)))
    measured = asyncio.run(whole_app(app, key, args.rounds))
    print(f"\nCPU us per request through the whole app (median of {args.rounds} alternated rounds, best in brackets)\n")
    for name, values in measured.items():
        print(f"{name:24s} {statistics.median(values):7.1f}  ({min(values):.1f})")
    ratios = [noop / predict for noop, predict in zip(measured["no-op, 8 at once"], measured["predict, 8 at once"])]
    extra = [predict - noop for noop, predict in zip(measured["no-op, 8 at once"], measured["predict, 8 at once"])]
    print(f"\n8 at once: a prediction costs {statistics.median(extra):.1f} us more than the no-op route; no-op/predict {statistics.median(ratios):.0%} "
          f"(rounds: {min(ratios):.0%}-{max(ratios):.0%})\n\neach piece alone, best of 7 (us)\n")
    for name, us in pieces(app, key).items():
        print(f"{name:46s} {us:7.2f}")


if __name__ == "__main__":
    main()
