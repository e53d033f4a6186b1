"""The main job end to end, on one machine: ``fedmeta demo``.

1. Synthesize a hospital network (per-site CSV files plus the schema); about
   a fifth of the hospitals are held out of training entirely.
2. Meta-train over a Flower simulation, and train the alternatives on the
   same splits (:mod:`fedmeta.evaluate`): local-only, the pooled oracle,
   FedAvg and FedAvg with fine-tuning.
3. Personalize every hospital, seen and unseen, as ``fedmeta personalize``
   does by default (the candidate chosen on validation folds of its training
   rows); export exactly the model the table scored to ONNX, and register and
   promote it in one site home.
4. Print the results table and write ``report.md`` and ``results.json``.

``fedmeta demo --serve SITE`` then serves that hospital's model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fedmeta.evaluate import MethodResult, Progress, evaluate, hospital_federation_on_disk, shots_for
from fedmeta.evaluate.harness import each
from fedmeta.personalize import choose_personalization, data_lineage, load_base, publish, register_base
from fedmeta.registry import SiteHome
from fedmeta.report import write_report


@dataclass
class DemoResult:
    results: dict[str, MethodResult]
    site_home: Path
    report: Path
    data_dir: Path
    sites: list[str]
    seconds: float


def run_demo(
    out: Path,
    n_sites: int = 47,
    rounds: int = 20,
    algorithm: str = "fomaml",
    shots: int = 10,
    seed: int = 0,
    hidden: tuple[int, ...] = (64, 64),
    progress: Progress = lambda message: None,
    observer=None,
) -> DemoResult:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    progress(f"synthesizing {n_sites} hospitals (uneven sizes, case mix and base rates) in {out / 'data'}")
    fed = hospital_federation_on_disk(out / "data", n_sites=n_sites, seed=seed)
    chosen: dict = {}  # each hospital's chosen personalization, as scored in the table: what gets registered
    results = evaluate(fed, out, algorithms=(algorithm,), rounds=rounds, hidden=hidden, shots=shots, seed=seed, progress=progress, observer=observer,
                       keep=chosen)

    progress(f"exporting and registering a personalized model for each of {len(fed.seen) + len(fed.unseen)} hospitals")
    home = SiteHome(out / "site-home")
    base = load_base(out / "runs" / algorithm)
    base_version = register_base(home, base, actor="fedmeta-demo")
    adaptation = base.adaptation
    names = []
    every = [(folder, site) for folder, sites in ((fed.train_dir, fed.seen), (fed.unseen_dir, fed.unseen)) for site in sites]
    for folder, site in each(progress, every, "exporting and registering"):
        # The model the table scored; after an interrupted demo whose FedMeta stage was already finished, the same
        # choice again (deterministic for the seed), exactly as `fedmeta personalize` makes it by default.
        result = chosen.get(site.name) or choose_personalization(
            base.for_schema(site.schema), site, shots=shots_for(site, shots), lr=adaptation["lr"], seed=seed
        )
        publish(
            home, result.model, "personalized", site.name, base_version, base_version, result.metrics,
            data=data_lineage(folder / f"{site.name}.csv", rows=site.n_rows),
            training={"mode": result.mode, "shots": result.shots, "steps": result.steps, "steps_selection": result.steps_selection, "lr": result.lr,
                      "seed": seed, "unseen": folder == fed.unseen_dir},
            shots=result.shots if isinstance(result.shots, int) else None, personalized_tasks=result.tasks, promote=True, actor="fedmeta-demo", feature_ranges=site.feature_ranges(),
        )
        names.append(site.name)
    seconds = time.perf_counter() - started
    header = (
        f"# fedmeta demo\n\n{len(fed.seen)} hospitals train, {len(fed.unseen)} never take part (unseen); {rounds} rounds; "
        f"FedMeta = {algorithm}; K = {shots} shots per class; held-out rows of every hospital; {seconds:.0f} s end to end. "
        "Classification tasks: readmission and mortality; LOS MSE is length-of-stay error in target standard deviations."
    )
    report = write_report(out, title=f"{header}\n\nModels: `{home.path}` (`fedmeta models list --site-home {home.path}`).")
    return DemoResult(results, home.path, report, fed.train_dir, names, seconds)
