"""The main job end to end: `fedmeta demo --quick`, then the served model answers the printed curl command."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from fedmeta.registry import SiteHome

pytestmark = pytest.mark.slow  # Flower simulations or deployments: the suite's end-to-end runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interrupt_during_training(out) -> str:
    """Start the quick demo, Ctrl-C it once FedAvg has checkpointed a round; returns what it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "fedmeta.cli", "demo", "--quick", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "runs" / "fedavg" / "checkpoint.pt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the demo never reached federated training"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in output, output
    return output


def test_quick_demo_trains_personalizes_registers_reports_and_serves(tmp_path):
    out = tmp_path / "demo"
    stopped = _interrupt_during_training(out)
    finished_stages = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert {"local_only.json", "local_only_k.json", "pooled.json"} <= set(finished_stages)
    again = next(line for line in stopped.splitlines() if "Continue with: " in line).split("Continue with: ", 1)[1]
    run = subprocess.run([sys.executable, "-m", "fedmeta.cli", *shlex.split(again)[1:]], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json") if p.name in finished_stages} == finished_stages, "finished stages were reused"
    fedavg_rounds = [json.loads(line)["round"] for line in (out / "runs" / "fedavg" / "metrics.jsonl").read_text().splitlines()
                     if '"site": "*"' in line and '"phase": "train"' in line]
    assert fedavg_rounds == [1, 2, 3], "the interrupted FedAvg run resumed: every round exactly once"
    assert re.search(r"^resuming after round \d of 3 \(its checkpoint\)", run.stdout, re.M), run.stdout
    # The stages that go site by site show a bar, left at its last state: every site counted (local-only finished before the stop).
    for stage in ("personalizing (fedavg_ft)", "personalizing (fedmeta_fomaml)", "exporting and registering"):
        assert re.search(rf"^{re.escape(stage)} .* 6/6 ", run.stdout, re.M), (stage, run.stdout)
    # The printed table is the report's table, at 80 columns too.
    report_rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    printed = " ".join(run.stdout.split())
    assert f"fedmeta console --runs {out / 'runs'} --site-home console-home" in printed, "how to watch the rounds in the console"
    for row in report_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] in printed and " ".join(f"{c} {v}" for c, v in zip(("accuracy", "worst 10%"), cells[1:3])) in printed, row
    complete = subprocess.run([sys.executable, "-m", "fedmeta.cli", *shlex.split(again)[1:]], capture_output=True, text=True, timeout=120)
    assert complete.returncode == 0 and "complete" in complete.stdout and "training" not in complete.stdout
    report = (out / "report.md").read_text()
    for method in ("local only", "pooled oracle", "FedAvg", "FedAvg + fine-tuning on all rows", "FedMeta fomaml + chosen adaptation"):
        assert f"| {method}" in report
    results = json.loads((out / "results.json").read_text())
    assert results["sites"] == {"seen": 5, "unseen": 1}
    assert set(results["methods"]) == {"local_cv", "local_linear", "local_gbm", "local_only", "local_best", "local_only_k", "pooled", "fedavg", "fedavg_ft",
                                       "fedmeta_fomaml", "fedmeta_fomaml_global"}
    # What the demo is for, against controls from the same table: on the training hospitals, FedMeta with the chosen
    # adaptation beats FedAvg unadapted and K shots fitted at each site alone. Measured (accuracy; LOS MSE):
    # FedMeta + chosen 0.844; 0.209, FedAvg 0.789; 0.443, K-shot local 0.775; 0.351.
    seen = {name: method["seen"] for name, method in results["methods"].items()}
    for control in ("fedavg", "local_only_k"):
        assert seen["fedmeta_fomaml"]["acc"] > seen[control]["acc"] + 0.03, (control, seen)
        assert seen["fedmeta_fomaml"]["mse"] < 0.8 * seen[control]["mse"], (control, seen)
    for plot in ("rounds.png", "gains.png", "shots.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    # FedAvg and FedMeta move the same bytes here, so accuracy against bytes would repeat rounds.png: it is left out.
    assert results["methods"]["fedavg"]["bytes"] == results["methods"]["fedmeta_fomaml"]["bytes"]
    assert not (out / "communication.png").exists() and "communication.png" not in report
    scored = results["methods"]["fedmeta_fomaml"]["per_site"]
    assert set(results["held_out_rows"]) == {*scored["seen"], *scored["unseen"]}  # gains.png names each site's held-out rows
    home = SiteHome(out / "site-home")
    sites = home.registry.sites()
    assert len(sites) == 6 and all(home.registry.current(s) is not None for s in sites)
    # What is registered and served is what the table scored: the same candidate, the same held-out accuracy.
    stage = json.loads((out / "stages" / "fedmeta_fomaml.json").read_text())
    per_site = {**stage["seen"], **stage["unseen"]}
    for site in sites:
        manifest, _ = home.load(home.registry.current(site))
        assert manifest.training["steps_selection"]["chosen"] == stage["choices"][site], site
        accs = [v for k, v in manifest.metrics.items() if k.endswith(".personalized.acc")]
        assert abs(sum(accs) / len(accs) - per_site[site]["acc"]) < 1e-9, site

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fedmeta.cli", "demo", "--out", str(out), "--serve", sites[0], "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        curl = None
        deadline = time.time() + 60
        while curl is None and time.time() < deadline:
            line = server.stdout.readline()
            if line.startswith("curl "):
                curl = line.strip()
        assert curl is not None, "no curl example printed"
        for _ in range(100):  # the server starts right after printing the example
            answer = subprocess.run(shlex.split(curl), capture_output=True, text=True)
            if answer.returncode == 0 and answer.stdout:
                break
            time.sleep(0.1)
        prediction = json.loads(answer.stdout)
        assert prediction["model"]["site"] == sites[0] and prediction["rows"] == 1
        assert set(prediction["predictions"]) >= {"mortality", "length_of_stay"}
    finally:
        server.terminate()
        server.wait(timeout=30)
