"""Prediction-server throughput and latency: req/s, p50 and p99 at concurrency 1, 8 and 32, 1-row and 64-row bodies.

Starts ``fedmeta serve`` (one uvicorn worker) on a free 127.0.0.1 port and drives it from a separate
process with wrk (Debian package ``wrk``), with auth and validation on: every request carries an API
key and is validated and predicted in full. Each point runs ``--seconds`` (default 5).

The model is a hospital site's personalized model (18 encoded features, 64-64 body, three heads),
personalized from a round-0 base unless ``--site-home`` names an existing site home: weights do not
change the cost of a request.

    python benchmarks/serving_load.py [--seconds 5] [--json]
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
    subprocess.run(
        [sys.executable, "-m", "fedmeta.cli", "personalize", "--data", str(work / "data" / "hospital_002.csv"), "--schema", str(work / "data" / "schema.json"),
         "--base", str(base), "--site-home", str(home)],
        check=True, capture_output=True,
    )
    return home


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


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url], capture_output=True, text=True, check=True
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"50%\s+(\S+)", out).group(1)),
        "p99_ms": _ms(re.search(r"99%\s+(\S+)", out).group(1)),
        "errors": int(errors.group(1)) if errors else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--site-home", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (Debian's package)")

    work = Path(tempfile.mkdtemp(prefix="fedmeta-serving-"))
    home = Path(args.site_home) if args.site_home else build_site_home(work)
    key = subprocess.run(
        [sys.executable, "-m", "fedmeta.cli", "keys", "create", "--role", "predict", "--name", "load-test", "--site-home", str(home)],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "fedmeta.cli", "serve", "--site-home", str(home), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        wait_ready(url, server)
        for rows in (1, 64):
            body = json.dumps({"rows": [ROW] * rows})
            check = httpx.post(url + "/v1/predict", content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            check.raise_for_status()
            script = work / f"rows{rows}.lua"
            script.write_text(
                f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer {key}"\n'
            )
            run_wrk(url + "/v1/predict", script, 8, 2)  # warm-up
            for connections in (1, 8, 32):
                results[(rows, connections)] = run_wrk(url + "/v1/predict", script, connections, args.seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nPOST /v1/predict, 1 uvicorn worker, auth + validation on, wrk 1 thread, {args.seconds} s per point\n")
    print("| rows per request | concurrency | req/s | p50 | p99 | errors |")
    print("|---|---|---|---|---|---|")
    for (rows, connections), r in results.items():
        print(f"| {rows} | {connections} | {r['rps']:.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['errors']} |")
    if args.json:
        print(json.dumps({
            "rps_c8_1row": results[(1, 8)]["rps"],
            "p99_ms_c8_1row": results[(1, 8)]["p99_ms"],
            "rps_c8_64row": results[(64, 8)]["rps"],
            "points": {f"{rows}row_c{c}": r for (rows, c), r in results.items()},
        }))


if __name__ == "__main__":
    main()
