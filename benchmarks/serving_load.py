"""Prediction-server throughput and latency: req/s, p50 and p99 at concurrency 1, 8 and 32, 1-row and 64-row bodies.

First, the figure that travels between machines: 1-row ``/v1/predict`` throughput as a share of the
no-op liveness route's (``GET /v2/health/live``), both at concurrency 8 against the same server,
alternated (no-op, predict, no-op, predict, ...: ``--pairs``) so that a neighbour's load on a shared
machine falls on both; each pair gives a ratio and the range is reported. ``--ratio-only`` stops there.

Starts ``python -m serving`` (one uvicorn worker with the connection guard, see ``serving.server``) on a
free 127.0.0.1 port and drives it from a separate process with wrk (Debian package ``wrk``), with auth
and validation on: every request carries an API key and is validated and predicted in full. Each point
runs ``--seconds`` (default 5). A last row repeats 1 row at concurrency 8 while an admin client promotes
the site's two versions alternately every 100 ms (each promote verifies and loads a model and writes the
registry), and reports its throughput as a share of the steady figure.

The model is a hospital site's personalized model (18 encoded features, 64-64 body, three heads),
personalized from a round-0 base unless ``--site-home`` names an existing site home: weights do not
change the cost of a request.

    python benchmarks/serving_load.py [--seconds 5] [--pairs 3] [--ratio-only] [--site-home DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROW = {
    "age": 71, "sex": "F", "admission_type": "emergency", "ward": "cardiology", "prior_admissions": 2, "charlson_index": 4,
    "heart_rate": 96, "systolic_bp": 118, "creatinine": 1.4, "hemoglobin": 11.2, "sodium": 136, "wbc": 9.8,
}


def build_site_home(work: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_base  # the same round-0 base the tests use

    subprocess.run([sys.executable, "-m", "fedmeta.cli", "synth", "hospitals", str(work / "data"), "--sites", "3"], check=True, capture_output=True)
    base = write_base(work / "run", hidden=(64, 64))
    home = work / "site-home"
    for seed, promote in ((0, "--promote"), (1, "--no-promote")):  # two versions, for the promotion row
        subprocess.run(
            [sys.executable, "-m", "fedmeta.cli", "personalize", "--data", str(work / "data" / "hospital_002.csv"), "--schema", str(work / "data" / "schema.json"),
             "--base", str(base), "--site-home", str(home), "--seed", str(seed), promote],
            check=True, capture_output=True,
        )
    return home


def site_versions(url: str, admin_key: str) -> list[str]:
    listing = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {admin_key}"}).json()
    return [v["version"] for v in listing["versions"] if v["kind"] != "base"][-2:]


def promote_every(url: str, admin_key: str, versions: list[str], interval: float, stop: threading.Event, counts: dict) -> None:
    """Promote ``versions`` in turn every ``interval`` seconds until ``stop``; counts promotions and failures."""
    with httpx.Client(headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as admin:
        i, start = 0, time.monotonic()
        while not stop.is_set():
            r = admin.post(f"{url}/v1/models/{versions[i % len(versions)]}/promote")
            counts["ok" if r.status_code == 200 else "failed"] += 1
            i += 1
            stop.wait(max(0.0, start + i * interval - time.monotonic()))  # a fixed cadence: a slow promote does not stretch it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(url + "/v2/health/live", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not come up")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(url: str, script: Path | None, connections: int, seconds: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *(["-s", str(script)] if script else []), url], capture_output=True, text=True, check=True
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        # Anchored to the latency distribution's lines: the thread stats' "+/- Stdev" column (62.50%, 99.99%) also ends in these.
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
        "errors": int(errors.group(1)) if errors else 0,
    }


def measure_ratio(url: str, predict_script: Path, seconds: int, pairs: int) -> dict:
    """No-op liveness and 1-row predict at concurrency 8, alternated ``pairs`` times; each pair's ratio predict/no-op."""
    noop, predict = [], []
    run_wrk(url + "/v2/health/live", None, 8, 2)  # warm-up
    for _ in range(pairs):
        noop.append(run_wrk(url + "/v2/health/live", None, 8, seconds)["rps"])
        predict.append(run_wrk(url + "/v1/predict", predict_script, 8, seconds)["rps"])
    ratios = [p / n for n, p in zip(noop, predict)]
    return {"noop_rps": noop, "predict_rps": predict, "ratios": [round(r, 3) for r in ratios]}


def _span(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}–{max(values):{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--site-home", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pairs", type=int, default=3, help="alternated no-op/predict pairs for the ratio")
    parser.add_argument("--ratio-only", action="store_true", help="measure the no-op/predict ratio only")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (Debian's package)")

    work = Path(tempfile.mkdtemp(prefix="fedmeta-serving-"))
    home = Path(args.site_home) if args.site_home else build_site_home(work)
    key, admin_key = (
        subprocess.run(
            [sys.executable, "-m", "fedmeta.cli", "keys", "create", "--role", role, "--name", f"load-test-{role}", "--site-home", str(home)],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        for role in ("predict", "admin")
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "serving", "--site-home", str(home), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results, promotions = {}, {"ok": 0, "failed": 0}
    try:
        wait_ready(url, server)
        for rows in (1, 64):
            body = json.dumps({"rows": [ROW] * rows})
            check = httpx.post(url + "/v1/predict", content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            check.raise_for_status()
            (work / f"rows{rows}.lua").write_text(
                f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer {key}"\n'
            )
        run_wrk(url + "/v1/predict", work / "rows1.lua", 8, 2)  # warm-up
        ratio = measure_ratio(url, work / "rows1.lua", args.seconds, args.pairs)
        print(f"\nno-op GET /v2/health/live: {_span(ratio['noop_rps'], ',.0f')} req/s; 1-row POST /v1/predict: {_span(ratio['predict_rps'], ',.0f')} req/s "
              f"(concurrency 8, {args.seconds} s each, {args.pairs} alternated pairs)")
        print(f"1-row predict / no-op: {_span(ratio['ratios'], '.0%')} (each pair: {', '.join(f'{r:.0%}' for r in ratio['ratios'])})")
        if args.ratio_only:
            if args.json:
                print(json.dumps({"ratio": ratio}))
            return
        for rows in (1, 64):
            script = work / f"rows{rows}.lua"
            run_wrk(url + "/v1/predict", script, 8, 2)  # warm-up
            for connections in (1, 8, 32):
                results[(rows, connections)] = run_wrk(url + "/v1/predict", script, connections, args.seconds)
        versions = site_versions(url, admin_key)
        results[("1 (steady, just before)", 8)] = run_wrk(url + "/v1/predict", work / "rows1.lua", 8, args.seconds)  # the control, adjacent in time
        stop = threading.Event()
        promoter = threading.Thread(target=promote_every, args=(url, admin_key, versions, 0.1, stop, promotions))
        promoter.start()
        try:
            results[("1 (promote every 100 ms)", 8)] = run_wrk(url + "/v1/predict", work / "rows1.lua", 8, args.seconds)
        finally:
            stop.set()
            promoter.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nPOST /v1/predict, 1 uvicorn worker, auth + validation on, wrk 1 thread, {args.seconds} s per point\n")
    swapping = results[("1 (promote every 100 ms)", 8)]["rps"] / results[("1 (steady, just before)", 8)]["rps"]
    print("| rows per request | concurrency | req/s | p50 | p99 | errors |")
    print("|---|---|---|---|---|---|")
    for (rows, connections), r in results.items():
        print(f"| {rows} | {connections} | {r['rps']:.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['errors']} |")
    print(f"\nwhile promoting every 100 ms: {promotions['ok']} promotions ({promotions['failed']} failed), {swapping:.0%} of the steady 1-row c=8 throughput measured just before")
    if args.json:
        print(json.dumps({
            "ratio": ratio,
            "rps_c8_1row": results[(1, 8)]["rps"],
            "p99_ms_c8_1row": results[(1, 8)]["p99_ms"],
            "rps_c8_64row": results[(64, 8)]["rps"],
            "rps_c8_1row_promoting": results[("1 (promote every 100 ms)", 8)]["rps"],
            "promoting_share_of_steady": round(swapping, 3),
            "promotions": promotions,
            "points": {(f"{rows}row_c{c}" if isinstance(rows, int) else f"1row_c{c}_{'promoting' if 'promote' in rows else 'steady_before'}"): r
                       for (rows, c), r in results.items()},
        }))


if __name__ == "__main__":
    main()
