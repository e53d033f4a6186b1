"""How much slower the quick demo runs when the machine is already busy, and what thread limits buy.

Runs ``fedmeta demo --quick`` three ways, each in a fresh folder:

- idle: nothing else running (as far as this script knows: check ``uptime`` first);
- busy: with ``--burners`` CPU burners (one Python busy loop each) started by this script,
  with fedmeta's default thread limit (one thread per process, ``fedmeta.threads``);
- busy, unlimited: the same burners, with every process allowed torch's default
  threads (``FEDMETA_THREADS`` = the core count) — what fedmeta did before it set threads.

and prints the seconds of each and the slowdowns against the idle run (target: busy under
2.5x idle with two burners on two cores). The printed tables must be identical: threads change
speed, never results.

    python benchmarks/busy_machine.py [--json] [--burners 2] [--full]

``--full`` runs the full demo (47 hospitals, 20 rounds) instead of ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BURN = "while True:\n    pass\n"


def run_demo(out: Path, full: bool, threads: int | None) -> tuple[float, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FEDMETA_THREADS"):
        env.pop(name, None)
    if threads is not None:
        env["FEDMETA_THREADS"] = str(threads)
    command = [sys.executable, "-m", "fedmeta.cli", "demo", "--out", str(out)] + ([] if full else ["--quick"])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "COLUMNS": "200"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"demo failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, (out / "report.md").read_text().split("| method |", 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--burners", type=int, default=2)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedmeta-busy-") as tmp:
        work = Path(tmp)
        rows["idle"] = run_demo(work / "idle", args.full, None)
        burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(args.burners)]
        try:
            time.sleep(1)
            rows["busy"] = run_demo(work / "busy", args.full, None)
            rows["busy_unlimited"] = run_demo(work / "busy_unlimited", args.full, cores)
        finally:
            for b in burners:
                b.kill()
                b.wait()
    idle = rows["idle"][0]
    same = len({table for _, table in rows.values()}) == 1
    print(f"{'run':16s} {'seconds':>8s} {'x idle':>7s}")
    for name, (seconds, _) in rows.items():
        print(f"{name:16s} {seconds:8.1f} {seconds / idle:7.2f}")
    print(f"cores {cores}, burners {args.burners}, demo {'full' if args.full else 'quick'}; identical tables: {same}; "
          f"load average before the idle run: {load_before:.2f} (other jobs make 'idle' less idle)")
    if args.json:
        print(json.dumps({
            "idle_s": round(idle, 1), "busy_s": round(rows["busy"][0], 1), "busy_unlimited_s": round(rows["busy_unlimited"][0], 1),
            "busy_slowdown": round(rows["busy"][0] / idle, 2), "busy_unlimited_slowdown": round(rows["busy_unlimited"][0] / idle, 2),
            "burners": args.burners, "cores": cores, "full": args.full, "identical_tables": same, "load_before": round(load_before, 2),
        }))


if __name__ == "__main__":
    main()
