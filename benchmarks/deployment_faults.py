"""What goes wrong around a Deployment Engine run, tried once each on 127.0.0.1.

    python benchmarks/deployment_faults.py [--json]

On a SuperLink and three SuperNodes (``LoopbackDeployment``, the layout of
``examples/deployment/``: TLS, site keys, a persistent database, the gateway
that forwards only the Fleet API, a restart policy), with the hospital
federation's CSV files:

- with what every site holds (``ca.crt``, the gateway's address), a node key
  cannot be registered and a run cannot be started (``site_can_register_node``,
  ``site_can_start_run``);
- after round 1 of a run the SuperLink is restarted with its documented
  command: the sites come back by themselves, and launching again on the
  run folder resumes after round 1 (``sites_back_after_restart``,
  ``resumed_after_restart``);

- a second launch on a run folder that a run holds is refused, and no round
  is written twice (``double_launch_refused``, ``duplicate_rounds``);
- a SuperNode killed after round 1 is named by its site name in the run's
  summary, and ``fedmeta launch`` exits non-zero (``killed_site_named``,
  ``exit_status_with_dropped_site``);
- at the end, the surviving sites' homes hold the base model and, with
  ``[deployment] personalize = true``, a promoted personalized model
  (``base_model_at_sites``, ``personalized_at_sites``; the killed site's does not).

The last line is one JSON object with those figures (``--json`` prints only it).
``tests/test_fl_deployment_faults.py`` runs the same scenario and asserts on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CONFIG = """
name = "deployment-faults"
rounds = {rounds}
[federation]
kind = "csv"
n_sites = {n_sites}
data_dir = "{data}"
[model]
hidden = [16]
[local]
steps = 2
meta_batch = 2
[server]
min_sites = 2
sampling_timeout = 60
round_timeout = {round_timeout}
[evaluation]
every = {rounds}
[deployment]
personalize = {personalize}
"""


def write_config(root: Path, name: str, n_sites: int, rounds: int = 2, round_timeout: float = 90, personalize: bool = False) -> Path:
    path = root / f"{name}.toml"
    path.write_text(CONFIG.format(data=root / "data", n_sites=n_sites, rounds=rounds, round_timeout=round_timeout, personalize=str(personalize).lower()))
    return path


def wait_until(predicate, timeout: float = 120.0, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _sites_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "sites.json").read_text())["round"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def launch(dep, config: Path, run_dir: Path) -> subprocess.Popen:
    """``fedmeta launch`` against the deployment's coordinator connection, in the background."""
    command = [sys.executable, "-m", "fedmeta.cli", "launch", "loopback", "--config", str(config), "--run-dir", str(run_dir)]
    return subprocess.Popen(command, env=dep.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def double_launch_and_killed_site(dep, root: Path, victim: str = "supernode2", personalize: bool = False) -> dict:
    """Launch a 2-round run; launch again on its folder while it runs; kill ``victim`` after round 1.

    At the end the surviving sites receive the base model (and personalize it, with ``personalize``).
    Returns the figures, plus the outputs (``first_output``, ``second_output``) for a test to show.
    """
    from fedmeta.fl.delivery import base_model_at_sites, personalized_at_sites

    run_dir = root / "faults"
    config = write_config(root, "faults", n_sites=len(dep.sites), personalize=personalize)
    victim_site = dep.sites[list(dep.supernodes).index(victim)][0].stem
    first = launch(dep, config, run_dir)
    held = wait_until(lambda: (run_dir / ".lock").exists() and (run_dir / ".lock").stat().st_size > 0, timeout=180)
    # In the background: on a loaded machine the refused launch can take longer than the run's second round,
    # and the victim must be killed while that round runs.
    second = dep.start_run(config, run_dir, root / "second.log") if held else None
    wait_until(lambda: _sites_round(run_dir) >= 1 or first.poll() is not None, timeout=300)
    dep.kill_site(victim)  # SIGKILL, left down: no goodbye, the SuperLink learns it from missed heartbeats
    if second is not None:
        second.wait(timeout=300)
    second_output = (root / "second.log").read_text() if second else "(the first run never held the folder)"
    first_output, _ = first.communicate(timeout=600)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if (run_dir / "metrics.jsonl").exists() else []
    written = Counter(r["round"] for r in rows if r["site"] == "*" and r["phase"] == "train")
    summary = json.loads((run_dir / "sites.json").read_text()).get("summary") or {}
    return {
        "double_launch_refused": "is in use by Flower run" in second_output,
        "duplicate_rounds": sum(n - 1 for n in written.values()),
        "killed_site_named": victim_site in summary.get("trained_without", []) and victim_site in first_output,
        "exit_status_with_dropped_site": first.returncode,
        "base_model_at_sites": base_model_at_sites(run_dir / "base_model.pt", dep.site_homes.values()),
        "personalized_at_sites": personalized_at_sites(run_dir / "base_model.pt", dep.site_homes.values()),
        "first_output": first_output,
        "second_output": second_output,
    }


def restart_and_resume(dep, root: Path) -> dict:
    """Restart the SuperLink (the documented command: same port, same database) after round 1 of a 2-round run,
    then launch again on the same run folder: do the sites come back by themselves, and does the run resume?"""
    run_dir = root / "restart"
    config = write_config(root, "restart", n_sites=len(dep.sites))
    stream = dep.start_run(config, run_dir, root / "restart-stream.log")
    wait_until(lambda: (run_dir / "checkpoint.pt").exists() or stream.poll() is not None, timeout=300)
    down = dep.restart_superlink()
    stream.wait(60)
    back = dep.wait_online(len(dep.sites), timeout=120)
    result = dep.run(config, run_dir, timeout=600)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if (run_dir / "metrics.jsonl").exists() else []
    rounds = [r["round"] for r in rows if r["site"] == "*" and r["phase"] == "train"]
    return {
        "sites_back_after_restart": back,
        "resumed_after_restart": f"resuming {run_dir} after round 1" in result.stdout + result.stderr and rounds == [1, 2] and (run_dir / "base_model.pt").exists(),
        "superlink_down_seconds": round(down, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedmeta.data import write_hospital_federation
    from fedmeta.fl.loopback import LoopbackDeployment

    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="deployment-faults-") as tmp:
        root = Path(tmp)
        schema, paths = write_hospital_federation(root / "data", n_sites=3, seed=3)
        started = time.perf_counter()
        # The layout of examples/deployment/: TLS, site keys, a persistent database, the gateway, a restart policy.
        with LoopbackDeployment([(p, schema) for p in paths], log_dir=root, secure=True, gateway=True, supervise=True) as dep:
            dep.wait_online(3, timeout=120)
            figures["site_can_register_node"] = dep.site_can_register_node()
            figures["site_can_start_run"] = dep.site_can_start_run()
            figures.update(restart_and_resume(dep, root))
            result = double_launch_and_killed_site(dep, root, personalize=True)
        if not args.json:
            print(result["first_output"][-3000:])
            print(f"all scenarios: {time.perf_counter() - started:.0f} s")
        result.pop("first_output"), result.pop("second_output")
        figures.update(result)
    figures["sites"] = 3
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
