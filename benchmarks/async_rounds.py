"""Asynchronous (FedBuff) against synchronous rounds: wall-clock seconds until the global model reaches a target.

One federation and seed, trained four ways in simulation (synchronous and
asynchronous, with a straggler mix and with equal speeds) and two ways on
the Deployment Engine over loopback (:class:`fedmeta.fl.loopback.LoopbackDeployment`,
straggler mix). Every run keeps its global model after each round or server
step (``server.keep_every = 1``) with the seconds since the sites answered
the roll call (``elapsed`` in ``metrics.jsonl``: a simulation's start-up is
not counted); afterwards each kept model is scored as ``fedmeta`` scores a
round (:func:`fedmeta.fl.site_training.evaluate_site` on every site's held-out
rows, personalized with ``evaluation.shots`` per class), the same way for all.

- The speeds (:mod:`fedmeta.fl.stragglers`): with equal speeds every site
  waits ``--delay`` (the median) before replying; in the straggler mix each
  waits the median times a lognormal factor (sigma 0.5), and the slowest
  tenth of the sites (by name, the last ones) waits 10x the median (the
  issue's mix). The waits stand for each site's own hardware and link; here
  20 simulated sites share this machine's 2 cores, so the median wait is set
  by a principle: it is at least twice the seconds this machine needs to
  serve every simulated site once without waits, so that the cores are busy
  at most half the time and the sites' waits, as on a real network, set both
  runs' pace. Measured for issue 27: one site's local update alone takes
  c0 = 0.045 s (20 x c0 / 2 cores = 0.45 s), and a synchronous round of the
  20 sites with no waits, all 20 at once with Flower's and Ray's messaging,
  1.3 s; hence 3 s (it was 1.5 s before, when Flower served at most 6
  sites at once: :mod:`fedmeta.fl.simulation_polling`). On loopback the
  median is ``--deploy-delay``; there each message costs about half a minute
  of this machine's (a SuperNode polls every 3 s and starts an app process
  per message, 8 of them on 2 cores: on seed 1 a synchronous round beyond its
  slowest wait took 27.7 s, and a median site's asynchronous update about
  35 s for a 2 s wait), more than waits that fit the time can dominate, so
  the median is the largest that fits it: 8 synchronous rounds within about
  10 minutes, 8 x (27.7 + 10 x median) <= 600 s, hence 4 s (2 s before). The
  realized ratio of the slowest tenth's wait to the median is printed.
- Synchronous: every site every round, ``--rounds`` rounds. Asynchronous:
  every site busy, a server step per half the sites' updates (the default
  ``asynchronous.buffer``, chosen on seed 0 against 5 of 20; the server's
  settings are the synchronous run's), stopped (Ctrl-C)
  once it has trained as many seconds as the synchronous run (in simulation;
  on loopback, as many steps as consume twice the synchronous updates).
- The target is 98% of the synchronous run's final score; "seconds to target"
  is the first kept model at or above it. The final scores compare the last
  model of each run within the synchronous run's seconds.

The federation is the hospitals one (``examples/hospitals.toml``'s model and
local training, 20 sites in simulation, CSV sites on loopback); the score is
the mean personalized accuracy of its two classification tasks (mortality and
30-day readmission), example-weighted over sites. Scale (``--scale``):
``benchmarks/scale.py``'s seconds per round and peak memory at 100, 1,000 and
10,000 sites.

    python benchmarks/async_rounds.py [--json] [--sites 20] [--rounds 15] [--delay 3] [--deploy-sites 8] [--deploy-delay 4] [--scale]
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedmeta.data import write_hospital_federation
from fedmeta.data.federation import discover_sites
from fedmeta.fl.site_app import _synthetic_federation
from fedmeta.fl.config import RunConfig
from fedmeta.fl.loopback import LoopbackDeployment
from fedmeta.fl.normalization import to_text
from fedmeta.fl.run_dir import RunDir
from fedmeta.fl.sites import csv_site
from fedmeta.fl.site_training import evaluate_site
from fedmeta.fl.strategy import mean_site_metrics
from fedmeta.fl.stragglers import site_delay

DELAY = 3.0  # median seconds a simulated site waits before replying (the principle in the docstring)
DEPLOY_DELAY = 4.0  # on loopback (the largest that fits the time: the docstring)
SPREAD = 0.5  # the straggler mix's lognormal sigma, besides its slowest tenth
SLOWDOWN = 10.0  # the slowest tenth waits this many times the median
SYNC_SERVER = (1.0, 0.5)  # server lr and momentum of the synchronous runs: examples/hospitals.toml's
ASYNC_SERVER = (1.0, 0.5)  # of the asynchronous runs (chosen on seed 0's straggler mix; see --seed)


def slow_sites(names: list[str], delay: float = DELAY, seed: int = 0) -> dict[str, float]:
    """The straggler mix's slowest tenth: the last tenth of the names, waiting SLOWDOWN x the federation's median wait."""
    names = sorted(names)
    slow = names[len(names) - max(1, len(names) // 10):]
    config = RunConfig.from_dict({"seed": seed, "stragglers": {"delay": delay, "sigma": SPREAD}})
    median = statistics.median([site_delay(config, name) for name in names if name not in slow] + [math.inf] * len(slow))
    return {name: round(SLOWDOWN * median, 3) for name in slow}


def config_text(
    mode: str, sigma: float, sites: int, rounds: int, buffer: int | None, kind: str, data_dir: Path | None, cpus_per_site: float, slow: dict[str, float],
    delay: float = DELAY, seed: int = 0, server: tuple[float, float] | None = None,
) -> str:
    buffer_line = f"buffer = {buffer}\n" if buffer else ""
    buffer = buffer or math.ceil(sites / 2)  # asynchronous.buffer's default
    steps = math.ceil(2 * rounds * sites / buffer)
    server = server or SYNC_SERVER
    federation = f'kind = "csv"\ndata_dir = "{data_dir}"' if kind == "csv" else f'kind = "{kind}"\nn_sites = {sites}\nseed = {seed}'
    asynchronous = f"[asynchronous]\nenabled = true\nconcurrency = {sites}\n{buffer_line}" if mode == "async" else ""
    sigma_line = f"sigma = {sigma}\n" if sigma else ""
    if slow:
        sigma_line += "sites = {" + ", ".join(f"{name} = {seconds}" for name, seconds in slow.items()) + "}\n"
    return f"""name = "{mode}"
rounds = {steps if mode == "async" else rounds}
seed = {seed}
[federation]
{federation}
[model]
hidden = [64, 64]
[local]
steps = 10
meta_batch = 8
[server]
lr = {server[0]}
momentum = {server[1]}
min_sites = {buffer if mode == "async" else sites}
retries = 0
round_timeout = 600
keep_every = 1
[evaluation]
every = 1000000
[simulation]
cpus_per_site = {cpus_per_site}
{asynchronous}[stragglers]
delay = {delay}
{sigma_line}"""


def kept(run_dir: Path) -> list[tuple[float, int, dict]]:
    """``(elapsed, round, state)`` of every kept model, in order."""
    out = []
    for path in sorted((run_dir / "models").glob("round-*.pt")):
        saved = torch.load(path, weights_only=False)
        out.append((float(saved["elapsed"]), int(saved["round"]), saved["state"]))
    return out


def accuracy(metrics: dict[str, float]) -> float:
    """The mean personalized accuracy over the classification tasks."""
    values = [v for k, v in metrics.items() if k.endswith(".personalized.acc")]
    return sum(values) / len(values)


def scorer(config: RunConfig, run_dir: Path):
    """A function scoring a global state on every site of ``config``'s federation, as a round's evaluation does."""
    if config.federation.kind == "csv":
        stats = RunDir(run_dir).load_checkpoint().statistics
        count = config.federation.n_sites or len(discover_sites(config.federation.data_dir))  # unset in a deployment's csv run
        sites = [csv_site(config, i, to_text(stats) if stats else None) for i in range(count)]
    else:
        sites = list(_synthetic_federation(config.federation.model_dump_json()))

    def score(state: dict) -> float:
        return accuracy(mean_site_metrics([evaluate_site(config, site, state, seed=config.seed) for site in sites]))

    return score


def curve(run_dir: Path) -> list[tuple[float, int, float]]:
    config = RunDir(run_dir).load_config()
    score = scorer(config, run_dir)
    return [(elapsed, round_, score(state)) for elapsed, round_, state in kept(run_dir)]


def seconds_to(target: float, points: list[tuple[float, int, float]]) -> float | None:
    return next((elapsed for elapsed, _, value in points if value >= target), None)


def final_within(budget: float, points: list[tuple[float, int, float]]) -> float:
    return [value for elapsed, _, value in points if elapsed <= budget][-1]


def compare(sync: list, asynchronous: list) -> dict:
    """Seconds to 98% of the synchronous final score, their ratio, and the final scores within the synchronous seconds."""
    target = 0.98 * sync[-1][2]
    budget = sync[-1][0]
    sync_s, async_s = seconds_to(target, sync), seconds_to(target, asynchronous)
    return {
        "target": round(target, 4), "sync_s": round(sync_s, 2), "async_s": None if async_s is None else round(async_s, 2),
        "speedup": None if async_s is None else round(sync_s / async_s, 2),
        "sync_acc": round(sync[-1][2], 4), "async_acc": round(final_within(budget, asynchronous), 4), "budget_s": round(budget, 2),
        "sync_rounds": sync[-1][1], "async_steps": [r for e, r, _ in asynchronous if e <= budget][-1],
    }


def slowest_tenth_ratio(config_path: Path, names: list[str]) -> float:
    """The realized straggler mix: the slowest tenth's wait (90th percentile) over the median."""
    config = RunConfig.load(config_path)
    waits = sorted(site_delay(config, name) for name in names)
    return waits[min(len(waits) - 1, int(0.9 * len(waits)))] / statistics.median(waits)


def last_elapsed(run_dir: Path) -> float:
    """The ``elapsed`` of the run's last round or step so far (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0.0
    rows = [json.loads(line) for line in lines if line.strip()]
    return max((r["elapsed"] for r in rows if r["site"] == "*" and r["phase"] == "train"), default=0.0)


def train(work: Path, name: str, text: str, budget: float | None = None) -> Path:
    """``fedmeta train`` on ``text``; with ``budget``, stopped (Ctrl-C) once its steps have used that many seconds."""
    (work / f"{name}.toml").write_text(text)
    args = [sys.executable, "-m", "fedmeta.cli", "train", "--config", str(work / f"{name}.toml"), "--run-dir", str(work / name)]
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if budget is not None and last_elapsed(work / name) >= budget:
                proc.send_signal(signal.SIGINT)  # the run stops after its current step; the kept models stay
                proc.wait()
                break
            time.sleep(0.5)
    if proc.returncode not in ((0, 130) if budget is not None else (0,)):
        raise RuntimeError(f"{name}: fedmeta train failed (exit {proc.returncode}); see {work / f'{name}.log'}")
    return work / name


def simulation(work: Path, sites: int, rounds: int, buffer: int, seed: int, server: tuple[float, float], delay: float = DELAY) -> dict:
    cpus = round(2 / sites, 3)  # a waiting site holds its Ray worker: one worker per site
    out = {}
    names = [f"hospital_{k:03d}" for k in range(sites)]  # the generator's names (fedmeta.data.synthetic)
    for speeds, sigma, slow in (("stragglers", SPREAD, slow_sites(names, delay, seed)), ("equal", 0.0, {})):
        curves = {}
        run = train(work, f"sim-{speeds}-sync", config_text("sync", sigma, sites, rounds, buffer, "hospitals", None, cpus, slow, delay, seed))
        curves["sync"] = curve(run)
        # As many steps as fit in the synchronous run's seconds (at most ten times its updates).
        text = config_text("async", sigma, sites, 5 * rounds, buffer, "hospitals", None, cpus, slow, delay, seed, server)
        curves["async"] = curve(train(work, f"sim-{speeds}-async", text, budget=curves["sync"][-1][0]))
        out[speeds] = compare(curves["sync"], curves["async"])
        out[speeds]["slowest_tenth_over_median"] = round(slowest_tenth_ratio(work / f"sim-{speeds}-sync.toml", names), 2)
        print(f"simulation, {speeds}: {json.dumps(out[speeds])}", flush=True)
    return out


def deployment(work: Path, sites: int, rounds: int, buffer: int, delay: float, seed: int, server: tuple[float, float]) -> dict:
    schema, paths = write_hospital_federation(work / "data", n_sites=sites, seed=seed)  # the same files again with --work
    slow = slow_sites([p.stem for p in paths], delay, seed)
    curves = {}
    for mode in ("sync", "async"):
        if (work / f"deploy-{mode}" / "base_model.pt").exists():  # finished before (--work): score it again
            curves[mode] = curve(work / f"deploy-{mode}")
            continue
        path = work / f"deploy-{mode}.toml"
        path.write_text(config_text(mode, SPREAD, sites, rounds, buffer, "csv", work / "data", 1.0, slow, delay, seed, server if mode == "async" else SYNC_SERVER))
        (work / f"logs-{mode}").mkdir(exist_ok=True)
        with LoopbackDeployment([(p, schema) for p in paths], log_dir=work / f"logs-{mode}") as dep:
            result = dep.run(path, work / f"deploy-{mode}", timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"deployment {mode} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        curves[mode] = curve(work / f"deploy-{mode}")
    out = compare(curves["sync"], curves["async"])
    out["slowest_tenth_over_median"] = round(slowest_tenth_ratio(work / "deploy-sync.toml", [p.stem for p in paths]), 2)
    print(f"deployment over loopback, {sites} SuperNodes, stragglers: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--sites", type=int, default=20, help="simulated sites")
    parser.add_argument("--rounds", type=int, default=15, help="synchronous rounds")
    parser.add_argument("--buffer", type=int, default=None, help="asynchronous.buffer (default: half the sites, its default)")
    parser.add_argument("--deploy-sites", type=int, default=8, help="SuperNodes on loopback (0 skips the deployment)")
    parser.add_argument("--deploy-rounds", type=int, default=8)
    parser.add_argument("--deploy-buffer", type=int, default=None)
    parser.add_argument("--delay", type=float, default=DELAY, help="median seconds a simulated site waits (see the docstring's principle)")
    parser.add_argument("--deploy-delay", type=float, default=DEPLOY_DELAY, help="median seconds a SuperNode waits (each message also costs seconds of Flower's own)")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--seed", type=int, default=1, help="the run's and the federation's seed (settings were chosen on seed 0)")
    parser.add_argument("--scale", action="store_true", help="also run benchmarks/scale.py's populations")
    parser.add_argument("--work", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmeta-async-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = {} if args.skip_simulation else simulation(work, args.sites, args.rounds, args.buffer, args.seed, ASYNC_SERVER, args.delay)
        if args.deploy_sites:
            figures["deploy"] = deployment(work, args.deploy_sites, args.deploy_rounds, args.deploy_buffer, args.deploy_delay, args.seed, ASYNC_SERVER)
        if args.scale:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from scale import measure_scale

            figures["scale"] = measure_scale()
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
