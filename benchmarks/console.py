"""The coordinator console on a long run: how fast its run page paints and follows new rounds.

A real ``fedmeta train`` run of ``--rounds`` rounds (``examples/hospitals.toml``,
10 hospitals, evaluated every round so the charts carry the most series) is
made once in ``--work``; the console (``fedmeta console``, one process) then
serves a copy of it that this script keeps "live": it holds the copy's lock as a
training process would and appends one round of rows (the last round's, renumbered)
at a time. Debian's Chromium, through Playwright, measures:

- **first paint**: from navigation to the run page's first contentful paint,
  and to the page showing the round, the sites and every chart;
- **update latency**: from a round's rows being appended to the page showing
  that round (the page polls every second, so about half a second is expected),
  over ``--updates`` rounds;
- the API's own time for ``GET /api/runs/{name}`` and ``/metrics`` (median of 20).

``--screenshot PATH`` saves the run page (the README's picture).

    python benchmarks/console.py [--rounds 200] [--updates 10] [--work DIR] [--screenshot docs/console-run.png] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from serving.auth import KeyStore

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trained_run(work: Path, rounds: int) -> Path:
    run = work / f"hospitals-{rounds}"
    if not (run / "base_model.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fedmeta.cli", "train", "--config", str(ROOT / "examples" / "hospitals.toml"), "--rounds", str(rounds),
                        "--set", "evaluation.every=1", "--run-dir", str(run)], check=True, stdout=subprocess.DEVNULL)
        print(f"trained {run} in {time.perf_counter() - started:.0f} s", flush=True)
    return run


def live_copy(run: Path, runs: Path) -> tuple[Path, list[dict]]:
    """A copy of ``run`` without its base model, its lock held by this process: a run in progress to the console."""
    copy = runs / "live"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("base_model.pt", "regions", ".lock"))
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in rows if r["phase"] == "train")
    config = (copy / "config.toml").read_text()
    (copy / "config.toml").write_text(config.replace(f"rounds = {last}", f"rounds = {last + 50}", 1))
    (copy / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "engine": "simulation"}))
    template = [r for r in rows if r.get("round") == last or r.get("logged_in_round") == last + 1]
    return copy, template


def append_round(copy: Path, template: list[dict], round_: int) -> None:
    last = max(r["round"] for r in template if r["phase"] == "train")
    shift = round_ - last
    lines = [json.dumps({**r, "round": r["round"] + shift, **({"logged_in_round": r["logged_in_round"] + shift} if "logged_in_round" in r else {})}) for r in template]
    with (copy / "metrics.jsonl").open("a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="console-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run = trained_run(work, args.rounds)
    runs, home = work / "console-runs", work / "console-home"
    runs.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    copy, template = live_copy(run, runs)
    key = KeyStore(home).create("bench", "viewer")[1]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    console = subprocess.Popen([sys.executable, "-m", "fedmeta.cli", "console", "--runs", str(runs), "--site-home", str(home), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                httpx.get(base + "/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"X-API-Key": key}
        api = {}
        for path in ("/api/runs/live", "/api/runs/live/metrics"):
            times = []
            for _ in range(20):
                started = time.perf_counter()
                httpx.get(base + path, headers=headers).raise_for_status()
                times.append(time.perf_counter() - started)
            api[path] = round(1000 * statistics.median(times), 1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base + "/signin")
            page.evaluate(f"sessionStorage.setItem('fedmeta-console-key', {json.dumps(key)})")
            started = time.perf_counter()
            page.goto(base + "/runs/live")
            page.wait_for_function("() => document.querySelector('#round') && document.querySelectorAll('#sites tbody tr').length > 0 && document.querySelectorAll('[data-chart] polyline').length >= 2")
            loaded = time.perf_counter() - started
            paint = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null")
            shown = int(page.get_attribute("#round", "data-round"))
            latencies = []
            for i in range(1, args.updates + 1):
                time.sleep(0.37)  # out of step with the page's one-second poll
                appended = time.perf_counter()
                append_round(copy, template, shown + i)
                page.wait_for_function(f"() => Number(document.querySelector('#round').dataset.round) >= {shown + i}", polling=20)
                latencies.append(time.perf_counter() - appended)
            if args.screenshot:
                args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshot), full_page=False)
            browser.close()
    finally:
        console.terminate()
        console.wait(timeout=30)
    figures = {
        "rounds_shown": shown, "first_contentful_paint_ms": round(paint, 1) if paint is not None else None,
        "page_complete_ms": round(1000 * loaded, 1), "update_latency_ms": {"median": round(1000 * statistics.median(latencies), 1), "max": round(1000 * max(latencies), 1)},
        "api_median_ms": api, "metrics_rows": sum(1 for _ in (copy / "metrics.jsonl").open()),
    }
    print(f"run page of a {shown}-round run ({figures['metrics_rows']} metric rows): first paint {figures['first_contentful_paint_ms']} ms, "
          f"round, sites and charts shown after {figures['page_complete_ms']} ms; a new round on the page after "
          f"{figures['update_latency_ms']['median']} ms (median of {args.updates}, max {figures['update_latency_ms']['max']} ms); API {api}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
