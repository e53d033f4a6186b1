"""Contribution tracking against the ground truth: exact Shapley by retraining every coalition, and the run's estimates.

The federation (``--sites``, 6 to 8, CSV folders) has known quality differences:

- sizes from 60 to 480 rows (a factor 8, geometric), dealt to the site names at random;
- the second-largest site's training labels are shuffled among its training rows
  (its held-out rows keep their true labels: it is scored like any site);
- the third-largest is a free rider (``simulation.free_riders``): it sends a zero
  update while claiming its examples.

Every site draws its rows from one shared concept (a logistic teacher with one
interaction; features shifted a little per site), so an honest site's value grows
with its rows. The schema states every feature's mean and std (from the sites'
training rows, :func:`fedmeta.data.federation.federation_statistics`), so the
simulation and the in-process retraining encode rows identically without the
roll call's sums.

**Exact Shapley.** For every coalition S (2^n of them; the empty one's model is
the initial model) the federation is trained with only S's sites, in process
(no Flower), exactly as a run trains: each round every site of S runs
:func:`fedmeta.fl.site_training.local_update` from the global model with the
run's round seed (a free rider's update is zeros, weighted by its examples), and
the server combines with :func:`~fedmeta.fl.aggregation.group_updates` and
:func:`~fedmeta.fl.aggregation.weighted_mean` and steps with the run's server
optimizer (:meth:`fedmeta.fl.strategy.MetaStrategy.aggregate_train`).
``server.min_sites`` is 1, so a single site's coalition trains too. The utility
v(S) is the mean over ALL sites of (validation loss of the initial model minus
that of S's final model) on their held-out rows, the loss being
:func:`fedmeta.meta.inner.make_loss`'s averaged over a site's tasks weighted by
rows. The values are :func:`fedmeta.fl.contributions.exact_shapley` of v; the
grand coalition's model is checked against the run's base model.

**Estimates.** Two Flower simulations of the same configuration and seed,
``contributions.enabled`` on and off, timed (wall seconds of
:func:`fedmeta.fl.simulation.run_simulation`; ``cost_ratio`` = on / off, and
``cost_ratio_training`` of the rounds alone, without Ray's start-up; with
``--repeats`` the medians of alternating pairs); the estimates are the on
run's ``contributions.json``.

Seeds: ``--seed`` 0 is the selection seed, 1 the reported one.

    python benchmarks/contributions.py [--json] [--sites 6] [--rounds 10] [--seed 0] [--algorithm reptile] [--repeats 1] [--work DIR]

Prints a per-site table (site, rows, quality, exact Shapley, estimate, CI), then
(``--json``) one JSON line: ``{"spearman_vs_exact": r, "cost_ratio": x,
"free_rider_last": bool, "shuffled_last": bool, "bad_sites_bottom_two": bool,
"exact": {...}, "estimate": {...}, "seconds": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedmeta.data import SiteData
from fedmeta.data.federation import federation_statistics, write_federation
from fedmeta.data.schema import Schema, TaskColumn, numeric_schema
from fedmeta.data.site import held_out_mask
from fedmeta.evaluate.federations import folder_federation
from fedmeta.evaluate.harness import run_config
from fedmeta.files import atomic_write_json
from fedmeta.fl.aggregation import FlatState, SiteUpdate, group_updates, make_server_optimizer, select_for_tasks, unflatten_state, weighted_mean
from fedmeta.fl.config import RunConfig
from fedmeta.fl.contributions import exact_shapley
from fedmeta.fl.data_defaults import choose as choose_defaults
from fedmeta.fl.site_training import build_model, local_update
from fedmeta.fl.sites import prepare_federation
from fedmeta.meta.inner import make_loss
from fedmeta.threads import limit_threads

HIDDEN = (32,)
FEATURES = 8
TEST_FRACTION = 0.25
SMALLEST, SIZE_FACTOR = 60, 8
LABEL = "y"
SHUFFLED, FREE_RIDER, HONEST = "labels shuffled", "free rider", "honest"


# --------------------------------------------------------------------------
# The federation
# --------------------------------------------------------------------------


def site_sizes(n_sites: int, smallest: int = SMALLEST, factor: float = SIZE_FACTOR) -> list[int]:
    """``n_sites`` row counts from ``smallest`` to ``factor`` times it, evenly spaced in log.

    >>> site_sizes(4, 60, 8)
    [60, 120, 240, 480]
    """
    return [int(round(smallest * factor ** (i / (n_sites - 1)))) for i in range(n_sites)]


def quality_roles(sizes: Mapping[str, int]) -> dict[str, str]:
    """Who is bad: the second-largest site has shuffled labels, the third-largest is a free rider (sizes keep them from being the weakest anyway)."""
    by_size = sorted(sizes, key=lambda s: (-sizes[s], s))
    roles = {site: HONEST for site in sizes}
    roles[by_size[1]], roles[by_size[2]] = SHUFFLED, FREE_RIDER
    return roles


def shuffle_training_labels(frame: pd.DataFrame, site: str, seed: int, rng: np.random.Generator, test_fraction: float = TEST_FRACTION) -> pd.DataFrame:
    """``frame`` with its label permuted among the rows training uses; held-out rows (the one split rule) keep theirs."""
    out = frame.copy()
    train_rows = np.flatnonzero(~held_out_mask(site, len(frame), test_fraction, seed))
    labels = out[LABEL].to_numpy().copy()
    labels[train_rows] = labels[rng.permutation(train_rows)]
    out[LABEL] = labels
    return out


def federation_frames(n_sites: int, seed: int) -> tuple[Schema, dict[str, pd.DataFrame], dict[str, str]]:
    """The schema (statistics unset), one table per site (``site_0``..: sorted names are partition ids), and each site's role."""
    if not 6 <= n_sites <= 8:
        raise ValueError(f"--sites must be between 6 and 8 (2^n coalitions are retrained), got {n_sites}")
    rng = np.random.default_rng([seed, 29])
    teacher = rng.normal(0, 1, FEATURES)
    teacher /= np.linalg.norm(teacher)
    names = [f"site_{i}" for i in range(n_sites)]
    sizes = dict(zip(names, rng.permutation(site_sizes(n_sites))))
    roles = quality_roles(sizes)
    frames = {}
    for name in names:
        x = rng.normal(rng.normal(0, 0.3, FEATURES), 1.0, (int(sizes[name]), FEATURES))
        logit = 3.0 * x @ teacher + 1.0 * x[:, 0] * x[:, 1]
        frame = pd.DataFrame(x.round(4), columns=[f"x{j}" for j in range(FEATURES)])
        frame[LABEL] = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
        frames[name] = shuffle_training_labels(frame, name, seed, rng) if roles[name] == SHUFFLED else frame
    schema = numeric_schema(FEATURES, [TaskColumn(name="outcome", kind="binary", label=LABEL, classes=["0", "1"])], name="contributions")
    return schema, frames, roles


def write_contribution_federation(out: Path, n_sites: int, seed: int) -> dict[str, str]:
    """The federation as CSV sites plus a ``schema.json`` that states every mean and std; returns each site's role."""
    schema, frames, roles = federation_frames(n_sites, seed)
    raw = [SiteData.from_frame(name, schema, frame, name, TEST_FRACTION, seed=seed) for name, frame in frames.items()]
    write_federation(out, schema.with_statistics(federation_statistics(raw)), frames)
    return roles


# --------------------------------------------------------------------------
# Exact Shapley by retraining
# --------------------------------------------------------------------------


def round_seed(config: RunConfig, round_: int, partition: int) -> int:
    """The seed a simulated site trains a round with (the rule of ``fedmeta.fl.site_app._site_round``)."""
    return config.seed * 1_000_003 + round_ * 1009 + max(partition, 0)


def site_update(config: RunConfig, site: SiteData, partition: int, state: FlatState, round_: int, free_rider: bool) -> SiteUpdate:
    """What the server receives from ``site`` in a round: its update on the model it is sent and its examples per task."""
    sent = select_for_tasks(state, site.tasks)
    examples = {t: site.n_labelled(t, train=True) for t in site.tasks}
    if free_rider:
        return SiteUpdate(site.name, {k: torch.zeros_like(v) for k, v in sent.items()}, examples)
    update, _ = local_update(config, site, sent, round_seed(config, round_, partition))
    return SiteUpdate(site.name, update, examples)


def train_coalition(config: RunConfig, initial: FlatState, sites: Sequence[SiteData], coalition: frozenset[str], free_riders: frozenset[str]) -> FlatState:
    """The global model after ``config.rounds`` rounds of only ``coalition``'s sites (partition = index in ``sites``)."""
    s = config.server
    optimizer = make_server_optimizer(s.optimizer, s.lr, s.momentum, s.betas)
    state = {k: v.clone() for k, v in initial.items()}
    members = [(p, site) for p, site in enumerate(sites) if site.name in coalition]
    for round_ in range(1, config.rounds + 1):
        updates = [site_update(config, site, p, state, round_, site.name in free_riders) for p, site in members]
        if len(updates) < s.min_sites:
            continue  # a round with too few replies aggregates nothing
        state = optimizer.step(state, weighted_mean(group_updates(updates)))
    return state


def validation_loss(config: RunConfig, site: SiteData, state: FlatState) -> float:
    """``site``'s held-out loss under ``state``: the training loss per task, averaged over tasks weighted by rows."""
    model = build_model(config, site)
    params = unflatten_state(dict(state))["params"]
    total = rows = 0
    with torch.no_grad():
        for task in site.scored_tasks:
            x, y = site.split(task, train=False)
            loss = make_loss(model, task)(params, torch.from_numpy(x), torch.from_numpy(y), torch.ones(len(y)))
            total += float(loss) * len(y)
            rows += len(y)
    return total / rows


def utility(config: RunConfig, sites: Sequence[SiteData], initial: FlatState, final: FlatState) -> float:
    """The mean over all sites of the decrease of their held-out loss from ``initial`` to ``final``."""
    return float(np.mean([validation_loss(config, s, initial) - validation_loss(config, s, final) for s in sites]))


def coalition_values(
    config: RunConfig, initial: FlatState, sites: Sequence[SiteData], free_riders: frozenset[str], cache: Path | None = None, progress: Callable[[str], None] = print,
) -> dict[frozenset[str], float]:
    """v(S) for every coalition of ``sites``; with ``cache``, each value is kept as it is found (an interrupted run continues)."""
    known: dict[str, float] = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    names = [s.name for s in sites]
    values = {}
    coalitions = [frozenset(c) for size in range(len(names) + 1) for c in itertools.combinations(names, size)]
    started = time.perf_counter()
    for i, coalition in enumerate(coalitions, 1):
        key = ",".join(sorted(coalition))
        if key not in known:
            known[key] = 0.0 if not coalition else utility(config, sites, initial, train_coalition(config, initial, sites, coalition, free_riders))
            if cache is not None:
                atomic_write_json(cache, known)
        values[coalition] = known[key]
        if i % 16 == 0 or i == len(coalitions):
            progress(f"  coalitions: {i}/{len(coalitions)} ({time.perf_counter() - started:.0f} s)")
    return values


# --------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------


def benchmark_config(data_dir: Path, links: Path, seed: int, rounds: int, algorithm: str) -> tuple[RunConfig, list[SiteData]]:
    """The run's configuration as the simulation settles it (``n_sites`` and defaults from the rows), and the sites as it loads them."""
    fed = folder_federation(data_dir, links, [], TEST_FRACTION, seed)
    data = run_config(fed, algorithm, rounds, HIDDEN, seed).model_dump(mode="json", exclude_none=True)
    data["name"] = "contributions"
    data["server"]["min_sites"] = 1  # a coalition of one site trains like any other
    given = RunConfig.from_dict(data)
    config, sites = prepare_federation(given)
    config, _ = choose_defaults(config, sites, given)
    return config, sites


def with_sections(config: RunConfig, **sections: dict) -> RunConfig:
    """``config`` with ``sections`` merged into its own (e.g. ``simulation={"free_riders": [2]}``)."""
    data = config.model_dump(mode="json", exclude_none=True)
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return RunConfig.from_dict(data)


def simulate(config: RunConfig, run_dir: Path) -> tuple[float, Path]:
    """Wall seconds of one Flower simulation (0 if ``run_dir`` already holds the finished run) and its folder."""
    from fedmeta.fl.simulation import run_simulation

    timing = run_dir / "wall_seconds.json"
    if timing.exists() and (run_dir / "base_model.pt").exists():
        return float(json.loads(timing.read_text())["seconds"]), run_dir
    started = time.perf_counter()
    run_simulation(config, run_dir)
    seconds = time.perf_counter() - started
    atomic_write_json(timing, {"seconds": seconds})
    return seconds, run_dir


def training_seconds(run_dir: Path) -> float:
    """Seconds from the roll call to the end of the last round (``elapsed`` in ``metrics.jsonl``): the run without Ray's start-up."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(float(r["elapsed"]) for r in rows if r.get("phase") == "train" and r.get("site") == "*" and "elapsed" in r)


def base_difference(run_dir: Path, state: FlatState) -> float:
    """The largest absolute difference between a run's base model and ``state``."""
    saved = torch.load(run_dir / "base_model.pt", weights_only=False)["state"]
    return max(float((saved[k].float() - state[k].float()).abs().max()) for k in state)


def reported_values(report: dict) -> dict:
    """A contributions report without its timings, which differ between identical runs."""
    return {site: {k: entry.get(k) for k in ("contribution", "ci", "rounds", "rows", "failures")} for site, entry in report["sites"].items()}


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    from scipy.stats import spearmanr

    sites = sorted(a)
    return float(spearmanr([a[s] for s in sites], [b[s] for s in sites]).statistic)


def bottom(values: Mapping[str, float], k: int) -> set[str]:
    return set(sorted(values, key=lambda s: (values[s], s))[:k])


def table(sites: Sequence[SiteData], roles: Mapping[str, str], exact: Mapping[str, float], report: Mapping[str, dict]) -> str:
    lines = [f"{'site':<8} {'rows':>5}  {'quality':<16} {'exact':>9} {'estimate':>9}  ci"]
    for site in sites:
        est = report.get(site.name, {})
        ci = est.get("ci")
        shown = f"{est['contribution']:9.4f}" if "contribution" in est else f"{'-':>9}"
        lines.append(f"{site.name:<8} {site.n_rows:>5}  {roles[site.name]:<16} {exact[site.name]:9.4f} {shown}  "
                     + (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--sites", type=int, default=6, help="6 to 8 (2^n coalitions are retrained)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="0 selects, 1 reports")
    parser.add_argument("--algorithm", default="reptile", choices=("reptile", "fomaml", "maml", "metasgd", "fedavg"))
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (off, on) timed; the cost is the ratio of their medians")
    parser.add_argument("--exact-only", action="store_true", help="retrain the coalitions only (no Flower runs)")
    parser.add_argument("--work", type=Path, help="keep the federation, coalition values and runs here (what is finished is reused)")
    args = parser.parse_args()
    limit_threads()
    with tempfile.TemporaryDirectory(prefix="fedmeta-contributions-") as tmp:
        figures = run(args, args.work or Path(tmp))
    if args.json:
        print(json.dumps(figures))


def run(args, work: Path) -> dict:
    """The federation, the exact values and (unless ``--exact-only``) the two runs; returns the figures."""
    data = work / "data"
    if (data / "schema.json").exists():
        roles = federation_frames(args.sites, args.seed)[2]
    else:
        roles = write_contribution_federation(data, args.sites, args.seed)
    config, sites = benchmark_config(data, work / "links", args.seed, args.rounds, args.algorithm)
    names = [s.name for s in sites]
    free_riders = frozenset(name for name in names if roles[name] == FREE_RIDER)
    print(f"{len(sites)} sites, {sum(s.n_rows for s in sites)} rows; {args.rounds} rounds of {config.algorithm.name}, hidden {list(config.model.hidden)}; "
          f"free rider(s) {sorted(free_riders)}", flush=True)

    from fedmeta.fl.app import initial_state

    initial = initial_state(config)
    cache = work / f"coalitions-{config.algorithm.name}-{args.rounds}r.json"
    cached = cache.exists()
    started = time.perf_counter()
    values = coalition_values(config, initial, sites, free_riders, cache)
    exact = {site: float(v) for site, v in exact_shapley(names, values.__getitem__).items()}
    exact_seconds = time.perf_counter() - started
    print(f"exact Shapley over {len(values)} coalitions: {exact_seconds:.0f} s{' (values partly or wholly from ' + str(cache) + ')' if cached else ''}; "
          f"v(all) = {values[frozenset(names)]:.4f}", flush=True)
    figures: dict = {"sites": len(sites), "rounds": args.rounds, "seed": args.seed, "algorithm": config.algorithm.name,
                     "rows": {s.name: s.n_rows for s in sites}, "roles": roles, "exact": {k: round(v, 6) for k, v in exact.items()},
                     "v_all": round(values[frozenset(names)], 6), "exact_from_cache": cached,
                     "seconds": {"exact": round(exact_seconds, 1)}}
    if args.exact_only:
        print(table(sites, roles, exact, {}))
        return figures
    grand = train_coalition(config, initial, sites, frozenset(names), free_riders)
    return {**figures, **estimates(config, work / "runs", sites, roles, exact, grand, figures["seconds"], args.repeats)}


def estimates(
    config: RunConfig, runs: Path, sites: Sequence[SiteData], roles: Mapping[str, str], exact: Mapping[str, float], grand: FlatState, seconds: dict, repeats: int = 1,
) -> dict:
    """The runs with contributions off and on (``repeats`` pairs, alternating; the median seconds of each), the first on
    run's estimates against ``exact``, and the first off run's model against ``grand``."""
    names = [s.name for s in sites]
    free_riders = {name for name in names if roles[name] == FREE_RIDER}
    plain = with_sections(config, simulation={"free_riders": sorted(names.index(name) for name in free_riders)})  # partition ids: sorted names
    timed = {"off": [], "on": []}
    for i in range(repeats):
        for mode, settings in (("off", plain), ("on", with_sections(plain, contributions={"enabled": True}))):
            timed[mode].append(simulate(settings, runs / (mode if i == 0 else f"{mode}-{i + 1}")))
    off_dir, on_dir = timed["off"][0][1], timed["on"][0][1]
    off_s, on_s = (statistics.median(s for s, _ in timed[mode]) for mode in ("off", "on"))
    train_off, train_on = (statistics.median(training_seconds(d) for _, d in timed[mode]) for mode in ("off", "on"))
    report = json.loads((on_dir / "contributions.json").read_text())
    repeatable = all(reported_values(json.loads((d / "contributions.json").read_text())) == reported_values(report) for _, d in timed["on"])
    estimate = {site: float(entry["contribution"]) for site, entry in report["sites"].items()}
    print(table(sites, roles, exact, report["sites"]))
    difference = base_difference(off_dir, grand)
    print(f"runs (median of {repeats}): off {off_s:.1f} s, on {on_s:.1f} s wall (x{on_s / off_s:.2f}); rounds alone {train_off:.1f} s and {train_on:.1f} s (x{train_on / train_off:.2f}); "
          f"the grand coalition's retrained model differs from the off run's base model by {difference:.2e} at most", flush=True)
    bad = {name for name, role in roles.items() if role != HONEST}
    seconds.update({"run_off": round(off_s, 1), "run_on": round(on_s, 1), "training_off": round(train_off, 1), "training_on": round(train_on, 1),
                    **{f"{mode}_each": [round(s, 1) for s, _ in timed[mode]] for mode in ("off", "on")}})
    return {
        "spearman_vs_exact": round(spearman(exact, estimate), 4) if set(estimate) == set(exact) else None,
        # How far the ground truth itself follows the known quality: honest sites by rows, the bad ones below them.
        "spearman_exact_vs_known_quality": round(spearman(exact, {s.name: s.n_rows if roles[s.name] == HONEST else 0 for s in sites}), 4),
        "cost_ratio": round(on_s / off_s, 3),
        "cost_ratio_training": round(train_on / train_off, 3),
        "free_rider_last": bottom(estimate, 1) <= free_riders,
        "shuffled_last": bottom(estimate, 1) <= {n for n, r in roles.items() if r == SHUFFLED},
        "bad_sites_bottom_two": bottom(estimate, len(bad)) == bad,
        "exact_bad_sites_bottom_two": bottom(exact, len(bad)) == bad,
        "method": report.get("method"),
        "estimate": {k: round(v, 6) for k, v in estimate.items()},
        "ci": {site: entry.get("ci") for site, entry in report["sites"].items()},
        "grand_coalition_vs_run_max_abs": difference,
        "estimates_identical_over_repeats": repeatable,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
