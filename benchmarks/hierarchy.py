"""The regional level (global -> region -> site): the default personalization with and without regional bases.

Two federations per seed, the same hospitals and rows in both:

- ``regional``: :func:`fedmeta.data.hospitals.regional_hospital_frames`, where
  a site's region sets most of its case mix and outcome base rates (urban and
  rural networks), laid out ``<region>/<site>.csv``;
- ``random_regions``: the same sites with the regions dealt at random (the same
  region sizes) through ``regions.csv``: a level that carries no information.

Each is trained once over Flower (:func:`fedmeta.fl.simulation.run_simulation`,
reptile, ``--rounds`` global rounds, then ``--regional-rounds`` per region,
:mod:`fedmeta.fl.regional_rounds`); ``--unseen`` sites per region are left out
of training (the same sites in both federations). Every site is then personalized as ``fedmeta personalize`` does by
default (:func:`fedmeta.personalize.choose_personalization`), **flat**: from the
global base only, and **hierarchical**: weighing the site's regional base beside
it on the same folds (a seen site's regional candidates validated from its
region's base trained without it, ``regional_validation``). The score is a site's held-out accuracy (the mean over its
classification tasks), averaged over sites: the seen sites' held-out rows, and
the unseen sites of known regions (personalized from their region's base
without having trained in it), and those again as **new** sites with only
``--new-site-rows`` (30) of their training rows, where a region should matter
most. The flat figure of both federations comes from the same global rounds on
the same rows; only the regions differ. Beside them, the regional federation's
**ceiling** (:func:`ceiling`): each group's held-out accuracy under its sites'
true risk models, and under their regions', which the generator knows.

Seeds: ``regions.rounds`` was first 5, set before any measurement, and
reported on seeds 1 and 2; on selection seed 0, 20 rounds scored better than
5, reported on fresh seed 3. Validation bases and an allowance for the level
(0.03 in validation loss) were then chosen on seed 0 alone and reported on
fresh seed 4, then 5 and 6 with the new sites (``--seeds 5 6``): the level
lost on all three, the allowance was dropped and ``regions.rounds`` became 0
by default (docs/benchmarks.md, "Regions"). The benchmark still runs 20.

    python benchmarks/hierarchy.py [--json] [--sites 24] [--regions 4] [--unseen 2] [--rounds 20] [--regional-rounds 20] [--new-site-rows 30] [--seeds 5 6] [--workers 2] [--work DIR]

Prints a line per seed and federation, then (``--json``) one JSON line:
``{"regional": {"seen": {"flat": a, "hierarchical": b, "gain_points": g, "ceiling": {"site": c, "region": d}}, "unseen": {...}, "new": {...}},
"random_regions": {...}, "seeds": [...], ...}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmeta.data.federation import discover_sites
from fedmeta.data.hospitals import outcome_logits, regional_hospital_frames, regional_hospital_truth, write_hospital_federation
from fedmeta.data.site import SiteData
from fedmeta.data.synthetic import write_federation
from fedmeta.evaluate.federations import Federation, folder_federation
from fedmeta.evaluate.harness import run_config
from fedmeta.evaluate.site_scores import shots_for, site_summary
from fedmeta.files import atomic_write_text
from fedmeta.fl.config import RunConfig
from fedmeta.fl.regions import regional_base_path, validation_base_path
from fedmeta.personalize import choose_personalization, load_base
from fedmeta.threads import limit_threads

HIDDEN = (64, 64)
SHOTS = 10
GROUPS = ("seen", "unseen", "new")


def held_out_accuracy(metrics: dict[str, float], tasks: list[str]) -> float | None:
    """A site's personalized held-out accuracy, the mean over its classification tasks (None without one)."""
    per_task = {t: {k.split(".")[2]: v for k, v in metrics.items() if k.startswith(f"{t}.personalized.")} for t in tasks}
    return site_summary(per_task).get("acc")


def as_new_site(site: SiteData, rows: int, seed: int) -> SiteData:
    """The site as a new one: ``rows`` of its training rows (drawn with ``seed`` and its name), the same held-out rows."""
    rng = np.random.default_rng([seed, 28, *site.name.encode()])
    training = np.flatnonzero(~site.test_mask)
    keep = np.sort(np.concatenate([np.flatnonzero(site.test_mask), rng.choice(training, min(rows, len(training)), replace=False)]))
    return SiteData(site.name, site.schema, site.x[keep], {t: labels[keep] for t, labels in site.labels.items()}, site.test_mask[keep])


def ceiling(fed: Federation, n_sites: int, seed: int, regions: int) -> dict:
    """Each group's mean held-out accuracy of its sites' true risk models (``site``) and of their regions' (``region``).

    The truth knows each row's latent severity, which the features show only in part: no model of them passes
    ``site`` but by the luck of the held-out draws. ``region`` is what a perfect regional level could give a site
    that adapted nothing. Scored like the benchmark's models: a site's mean over its scored classification tasks.
    New sites share the unseen sites' held-out rows and so their ceiling.
    """
    _, frames, _ = regional_hospital_frames(n_sites, seed, regions)
    truths = regional_hospital_truth(n_sites, seed, regions)
    out: dict = {}
    for group, sites in (("seen", fed.seen), ("unseen", fed.unseen)):
        per_site: dict[str, list[float]] = {"site": [], "region": []}
        for site in sites:
            frame, truth = frames[site.name], truths[site.name]
            accs: dict[str, list[float]] = {"site": [], "region": []}
            for task in site.scored_tasks:
                column = site.schema.task(task)
                if not column.is_classification:
                    continue
                labels = site.labels[task]
                held_out = site.test_mask & ~np.isnan(labels)
                for level, risk in (("site", truth.risk), ("region", truth.region_risk)):
                    predicted = outcome_logits(frame, truth.severity, risk)[column.label] > 0
                    accs[level].append(float(np.mean(predicted[held_out] == labels[held_out])))
            if accs["site"]:
                for level in per_site:
                    per_site[level].append(statistics.mean(accs[level]))
        out[group] = {level: round(statistics.mean(v), 4) for level, v in per_site.items()}
    out["new"] = out["unseen"]
    return out


def unseen_sites(region_of: dict[str, str], per_region: int, seed: int) -> list[str]:
    """``per_region`` sites of every region, drawn with ``seed``, left out of training."""
    rng = random.Random(f"hierarchy-unseen/{seed}")
    by_region: dict[str, list[str]] = {}
    for site, region in sorted(region_of.items()):
        by_region.setdefault(region, []).append(site)
    return sorted(site for sites in by_region.values() for site in rng.sample(sites, per_region))


def write_random_regions(out: Path, n_sites: int, seed: int, regions: int) -> Path:
    """The regional federation's sites and rows, flat, with ``regions.csv`` dealing the same region sizes at random."""
    schema, frames, region_of = regional_hospital_frames(n_sites, seed, regions)
    write_federation(out, schema, frames)
    dealt = list(region_of.values())
    random.Random(f"hierarchy-random/{seed}").shuffle(dealt)
    atomic_write_text(out / "regions.csv", "site,region\n" + "".join(f"{site},{region}\n" for site, region in zip(region_of, dealt)))
    return out


def train(fed: Federation, run_dir: Path, rounds: int, regional_rounds: int, seed: int) -> Path:
    from fedmeta.fl.simulation import run_simulation

    config = run_config(fed, "reptile", rounds, HIDDEN, seed)
    config = RunConfig.from_dict({**config.model_dump(mode="json", exclude_none=True), "regions": {"rounds": regional_rounds, "min_sites": 3, "validation_bases": True}})
    if not (run_dir / "regions.json").exists():
        run_simulation(config, run_dir, resume=(run_dir / "checkpoint.pt").exists())
    return run_dir


def _personalize(job: tuple) -> tuple[str, float | None, float | None, bool]:
    """One site, flat and hierarchically: ``(group, flat accuracy, hierarchical accuracy, chose a regional candidate)``."""
    group, site, run_dir, regional_path, validation_path, seed = job
    limit_threads(1)
    base = _base(run_dir)
    trained = base.for_schema(site.schema)
    lr = base.adaptation["lr"]
    flat = choose_personalization(trained, site, shots=shots_for(site, SHOTS), lr=lr, seed=seed)
    hierarchical = flat  # a site with no regional base is personalized exactly as flat
    if regional_path is not None:
        regional = _base(regional_path).for_schema(site.schema)
        validation = _base(validation_path).for_schema(site.schema) if validation_path is not None else None
        hierarchical = choose_personalization(trained, site, shots=shots_for(site, SHOTS), lr=lr, seed=seed, regional=regional, regional_validation=validation)
    chose = hierarchical.steps_selection.get("chosen", "").startswith("regional:")
    return group, held_out_accuracy(flat.metrics, flat.tasks), held_out_accuracy(hierarchical.metrics, hierarchical.tasks), chose


@lru_cache(maxsize=8)
def _base(path: Path):
    return load_base(path)


def score(fed: Federation, run_dir: Path, seed: int, workers: int, new_site_rows: int) -> dict:
    """Every site personalized flat and hierarchically: ``{"seen"|"unseen"|"new": {"flat": [...], "hierarchical": [...]}}``,
    one accuracy per site; ``new`` are the unseen sites again with only ``new_site_rows`` training rows each."""
    regions = {s.name: s.region for folder in (fed.train_dir, fed.unseen_dir) if folder.exists() and any(folder.iterdir()) for s in discover_sites(folder)}
    jobs = []
    new = [as_new_site(site, new_site_rows, seed) for site in fed.unseen] if new_site_rows else []
    for group, sites in (("seen", fed.seen), ("unseen", fed.unseen), ("new", new)):
        for site in sites:
            region = regions.get(site.name)
            regional = regional_base_path(run_dir, region) if region else None
            # A seen site's regional candidates are validated from its region's base trained without it (fedmeta.fl.regional_rounds).
            validation = validation_base_path(run_dir, region, site.name) if regional is not None else None
            jobs.append((group, site, run_dir, regional, validation, seed))
    out: dict = {g: {"flat": [], "hierarchical": []} for g in GROUPS} | {"chose_regional": 0, "sites": len(fed.seen) + len(fed.unseen), "new_chose_regional": 0}
    with ProcessPoolExecutor(workers) as pool:
        for group, flat, hierarchical, chose in pool.map(_personalize, jobs):
            out["new_chose_regional" if group == "new" else "chose_regional"] += chose
            for label, acc in (("flat", flat), ("hierarchical", hierarchical)):
                if acc is not None:
                    out[group][label].append(acc)
    return out


def run_seed(work: Path, seed: int, args) -> dict:
    figures = {}
    # The same sites are left out of both federations: the seen sites, their rows and so the flat figures match.
    unseen = unseen_sites(regional_hospital_frames(args.sites, seed, args.regions)[2], args.unseen, seed)
    for kind in args.only:
        folder = work / f"seed{seed}" / kind
        data = folder / "data"
        if not (data / "schema.json").exists():
            if kind == "regional":
                write_hospital_federation(data, args.sites, seed, regions=args.regions)
            else:
                write_random_regions(data, args.sites, seed, args.regions)
        fed = folder_federation(data, folder / "links", unseen, seed=seed)
        started = time.perf_counter()
        run_dir = train(fed, folder / "run", args.rounds, args.regional_rounds, seed)
        trained_s = time.perf_counter() - started
        scores = score(fed, run_dir, seed, args.workers, args.new_site_rows)
        figures[kind] = scores
        if kind == "regional":
            figures["ceiling"] = ceiling(fed, args.sites, seed, args.regions)
            print(f"seed {seed}, ceiling (the true risk models): " + "; ".join(
                f"{group} site {levels['site']:.4f} region {levels['region']:.4f}" for group, levels in figures["ceiling"].items() if group != "new"), flush=True)
        means = {g: {k: round(statistics.mean(v), 4) for k, v in scores[g].items() if v} for g in GROUPS}
        new = (f"; new sites ({args.new_site_rows} rows) flat {means['new']['flat']:.4f} hierarchical {means['new']['hierarchical']:.4f}, "
               f"{scores['new_chose_regional']} of {len(scores['new']['flat'])} regional") if args.new_site_rows else ""
        print(
            f"seed {seed}, {kind}: seen flat {means['seen']['flat']:.4f} hierarchical {means['seen']['hierarchical']:.4f}; "
            f"unseen flat {means['unseen']['flat']:.4f} hierarchical {means['unseen']['hierarchical']:.4f}; "
            f"{scores['chose_regional']} of {scores['sites']} sites chose a regional candidate{new}; trained in {trained_s:.0f} s",
            flush=True,
        )
    return figures


def summary(per_seed: list[dict]) -> dict:
    """Mean over seeds of each seed's mean over sites; the regional federation's groups carry their ceiling (:func:`ceiling`)."""
    out = {}
    for kind in (k for k in per_seed[0] if k != "ceiling"):
        out[kind] = {
            group: {label: round(statistics.mean(statistics.mean(s[kind][group][label]) for s in per_seed), 4) for label in ("flat", "hierarchical")}
            for group in GROUPS if per_seed[0][kind][group]["flat"]
        }
        for group in out[kind]:
            out[kind][group]["gain_points"] = round(100 * (out[kind][group]["hierarchical"] - out[kind][group]["flat"]), 2)
            if kind == "regional":
                out[kind][group]["ceiling"] = {level: round(statistics.mean(s["ceiling"][group][level] for s in per_seed), 4) for level in ("site", "region")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--sites", type=int, default=24)
    parser.add_argument("--regions", type=int, default=4)
    parser.add_argument("--unseen", type=int, default=2, help="sites per region left out of training")
    parser.add_argument("--rounds", type=int, default=20, help="global rounds")
    parser.add_argument("--regional-rounds", type=int, default=20, help="regions.rounds (0 by default in a run: here, what was measured)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 6])
    parser.add_argument("--workers", type=int, default=2, help="sites personalized at once (one torch thread each)")
    parser.add_argument("--only", nargs="+", choices=("regional", "random_regions"), default=["regional", "random_regions"])
    parser.add_argument("--new-site-rows", type=int, default=30,
                        help="also score the unseen sites as new ones, with only this many training rows each (0: not)")
    parser.add_argument("--work", type=Path, help="keep the federations and runs here (a finished run is scored again, not retrained)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmeta-hierarchy-") as tmp:
        work = args.work or Path(tmp)
        per_seed = [run_seed(work, seed, args) for seed in args.seeds]
    figures = {**summary(per_seed), "seeds": args.seeds, "sites": args.sites, "regions": args.regions, "unseen_per_region": args.unseen,
               "rounds": args.rounds, "regional_rounds": args.regional_rounds, "new_site_rows": args.new_site_rows}
    print(f"mean over seeds {args.seeds}: {json.dumps({k: figures[k] for k in args.only})}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
