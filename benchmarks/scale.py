"""Cost of a synchronous round as the population grows, with a fixed sample (issue 27, item 5).

For each population (default 100, 1,000 and 10,000 FedProx synthetic sites) a
fresh process runs a small simulation in which ``sample`` sites train per
round, two at a time, and reports:

- ``round_s``: the median seconds of the training rounds after the first
  (``metrics.jsonl``); the first round also holds the one roll call of every site;
- ``roll_call_s``: seconds from the round loop's start until every site has
  answered the roll call (the observer's mapping-table hook fires then);
- ``first_round_s``: the first round, roll call included;
- ``server_peak_rss_mb``: the server process's peak resident memory (``getrusage``);
- ``peak_rss_mb``: the peak of the summed resident memory of the server process
  and all its descendants (Ray's raylet, GCS and workers), sampled every 0.5 s
  from ``/proc``.

Each population runs in its own process: Ray is started once per process,
and the server's peak memory must not carry over from the previous population.

    python benchmarks/scale.py [--populations 100 1000 10000] [--sample 20] [--rounds 6]

It prints one line per population and, last, one JSON line
``{"<population>": {"round_s", "peak_rss_mb", "server_peak_rss_mb", "roll_call_s", ...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RUN = """
name = "scale"
rounds = {rounds}
seed = 0
[federation]
kind = "fedprox"
n_sites = {population}
[model]
hidden = [16]
[local]
steps = {work}
meta_batch = 2
[server]
fraction_train = {fraction}
fraction_evaluate = {fraction}
min_sites = 2
[evaluation]
every = {every}
steps = 1
[simulation]
cpus_per_site = {cpus_per_site}
"""


def _children() -> dict[int, list[int]]:
    """``{parent pid: [child pids]}`` of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # The command name (2nd field) may hold spaces: the parent pid is the 2nd field after its ')'.
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MiB."""
    tree, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss_kb(pid)
        stack += tree.get(pid, [])
    return total / 1024


class PeakMemory:
    """Samples :func:`tree_rss_mb` of this process every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_population(population: int, sample: int, rounds: int, work: int, run_dir: Path) -> dict:
    """One simulation in this process; the figures of :mod:`benchmarks.scale` for ``population``."""
    from fedmeta.fl.app import RoundObserver
    from fedmeta.fl.config import RunConfig
    from fedmeta.fl.simulation import run_simulation

    class Timer(RoundObserver):
        """Times the roll call; keeps the 10,000-line mapping table out of the log."""

        started = answered = None
        done: list[float] = []

        def start(self, first_round: int, rounds: int) -> None:
            self.started = time.perf_counter()

        def round_done(self, round_: int, train: dict | None) -> None:
            self.done.append(time.perf_counter())

        def site_mappings(self, lines: list[str]) -> None:
            self.answered = time.perf_counter()

    config_path = run_dir.parent / f"scale-{population}.toml"
    # 2 sites train at once on this machine's cores, whatever their number.
    cpus_per_site = (os.cpu_count() or 2) / 2
    config_path.write_text(
        RUN.format(rounds=rounds, population=population, fraction=sample / population, work=work, every=rounds + 1, cpus_per_site=cpus_per_site)
    )
    config = RunConfig.load(config_path)
    timer = Timer()
    started = time.perf_counter()
    with PeakMemory() as memory:
        run_simulation(config, run_dir, observer=timer)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["site"] == "*" and r["phase"] == "train"]
    if len(train) < 2:
        raise RuntimeError(f"{run_dir}: {len(train)} training round(s) in metrics.jsonl; need at least 2 (--rounds)")
    # From one round's end to the next: the whole round, its checkpoint and sites.json included
    # (metrics.jsonl's "seconds" stop before them).
    whole = [b - a for a, b in zip(timer.done, timer.done[1:])]
    return {
        "round_s": statistics.median(whole),
        "rounds_s": [round(timer.done[0] - timer.started, 3)] + [round(w, 3) for w in whole],
        "metrics_round_s": statistics.median(r["seconds"] for r in train[1:]),
        "first_round_s": train[0]["seconds"],
        "roll_call_s": (timer.answered - timer.started) if timer.answered else None,
        "sites_per_round": statistics.median(r.get("sites", 0) for r in train[1:]),
        "peak_rss_mb": memory.peak_mb,
        "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sites_json_bytes": (run_dir / "sites.json").stat().st_size,
        "checkpoint_bytes": (run_dir / "checkpoint.pt").stat().st_size,
        "total_s": total,
    }


def measure_scale(populations=(100, 1000, 10000), sample: int = 20, rounds: int = 6, work: int = 2) -> dict:
    """``{population: figures}``, each population simulated in a fresh process (see the module docstring)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for population in populations:
            run_dir = Path(tmp) / f"run-{population}"
            args = [sys.executable, __file__, "--one", str(population), "--sample", str(sample), "--rounds", str(rounds), "--work", str(work), "--run-dir", str(run_dir)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(args, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"population {population} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            results[str(population)] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--sample", type=int, default=20, help="sites per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work", type=int, default=2, help="local steps per site and round")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one population
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_population(args.one, args.sample, args.rounds, args.work, args.run_dir)))
        return
    results = measure_scale(tuple(args.populations), args.sample, args.rounds, args.work)
    for population, r in results.items():
        print(
            f"{population:>6} sites: {r['round_s']:.3f} s/round (rounds {r['rounds_s']}), roll call {r['roll_call_s']:.1f} s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MiB (server {r['server_peak_rss_mb']:.0f} MiB), "
            f"sites.json {r['sites_json_bytes'] / 1024:.0f} KiB, checkpoint {r['checkpoint_bytes'] / 1024:.0f} KiB, {r['total_s']:.0f} s in all"
        )
    print(json.dumps({p: {k: r[k] for k in ("round_s", "peak_rss_mb", "server_peak_rss_mb", "roll_call_s")} for p, r in results.items()}))


if __name__ == "__main__":
    main()
