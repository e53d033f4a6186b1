"""The main job end to end: `fedmeta demo --quick`, then the served model answers the printed curl command."""

import json
import shlex
import socket
import subprocess
import sys
import time

from fedmeta.registry import SiteHome


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quick_demo_trains_personalizes_registers_reports_and_serves(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "fedmeta.cli", "demo", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = (out / "report.md").read_text()
    for method in ("local only", "pooled oracle", "FedAvg", "FedAvg + K-shot fine-tuning", "FedMeta fomaml + K-shot"):
        assert f"| {method}" in report
    results = json.loads((out / "results.json").read_text())
    assert results["sites"] == {"seen": 5, "unseen": 1}
    assert set(results["methods"]) == {"local_only", "local_only_k", "pooled", "fedavg", "fedavg_ft", "fedmeta_fomaml", "fedmeta_fomaml_global"}
    for plot in ("rounds.png", "gains.png", "shots.png", "communication.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    home = SiteHome(out / "site-home")
    sites = home.registry.sites()
    assert len(sites) == 6 and all(home.registry.current(s) is not None for s in sites)

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
