"""Seconds per federated round, in simulation and on the Deployment Engine, and upload bytes.

- simulation: 10 hospital sites, a small MLP, median seconds of a training round after the first
  (which includes Ray's start-up);
- deployment: a SuperLink and SuperNodes on 127.0.0.1 (``fedmeta.fl.loopback``), CSV site data,
  evaluation every round: median seconds of a round after the first (each site scores the model it
  receives, then trains on it, in one message), and of the final, stand-alone evaluation;
- bytes uploaded per site per round (the update's ArrayRecord).

    python benchmarks/rounds.py [--json] [--deploy-sites 2] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmeta.data import write_hospital_federation
from fedmeta.fl.loopback import LoopbackDeployment

RUN = """
name = "bench"
rounds = {rounds}
[federation]
kind = "{kind}"
n_sites = {sites}
{data_dir}
[model]
hidden = [32, 32]
[local]
steps = 5
meta_batch = 4
[server]
min_sites = {sites}
[evaluation]
every = {every}
[simulation]
cpus_per_site = 0.2
"""


def summaries(run_dir: Path, phase: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["site"] == "*" and r["phase"] == phase]


def simulation(work: Path, rounds: int, sites: int) -> dict:
    config = work / "sim.toml"
    config.write_text(RUN.format(rounds=rounds, kind="hospitals", sites=sites, data_dir="", every=rounds))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedmeta.cli", "train", "--config", str(config), "--run-dir", str(work / "sim")], check=True, capture_output=True)
    total = time.perf_counter() - started
    train = summaries(work / "sim", "train")
    return {
        "first_round_s": train[0]["seconds"],
        "round_s": statistics.median(r["seconds"] for r in train[1:]),
        "upload_bytes_per_site": statistics.median(r["upload_bytes"] / r["sites"] for r in train),
        "command_s": total,
    }


def deployment(work: Path, rounds: int, sites: int) -> dict:
    schema, paths = write_hospital_federation(work / "data", n_sites=sites, seed=0)
    config = work / "deploy.toml"
    config.write_text(RUN.format(rounds=rounds, kind="csv", sites=sites, data_dir=f'data_dir = "{work / "data"}"', every=1))
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=work) as dep:
        result = dep.run(config, work / "deploy")
    if result.returncode != 0:
        raise RuntimeError(f"deployment run failed:\n{result.stdout}\n{result.stderr}")
    train, evaluate = summaries(work / "deploy", "train"), summaries(work / "deploy", "evaluate")
    return {
        "first_round_s": train[0]["seconds"],
        "round_s": statistics.median(r["seconds"] for r in train[1:]),
        "final_evaluate_s": evaluate[-1]["seconds"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sim-sites", type=int, default=10)
    parser.add_argument("--deploy-sites", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmeta-rounds-") as tmp:
        work = Path(tmp)
        sim = simulation(work, args.rounds, args.sim_sites)
        print(
            f"simulation, {args.sim_sites} sites: first round {sim['first_round_s']:.2f} s, then {sim['round_s']:.2f} s/round; "
            f"upload {sim['upload_bytes_per_site'] / 1000:.1f} kB/site/round; whole command {sim['command_s']:.1f} s",
            flush=True,
        )
        dep = deployment(work, args.rounds, args.deploy_sites)
        print(
            f"deployment, {args.deploy_sites} SuperNodes on loopback: first round {dep['first_round_s']:.2f} s, "
            f"then {dep['round_s']:.2f} s per round (training + evaluation); final evaluation alone {dep['final_evaluate_s']:.2f} s"
        )
    if args.json:
        print(json.dumps({"sim_round_s": round(sim["round_s"], 3), "deploy_round_s": round(dep["round_s"], 3),
                          "deploy_final_evaluate_s": round(dep["final_evaluate_s"], 3), "upload_bytes_per_site": int(sim["upload_bytes_per_site"])}))


if __name__ == "__main__":
    main()
