"""Why the per-site choice wins or loses: every candidate refit and scored on the held-out rows, beside the choice.

A diagnostic, not a tuning tool: it reads held-out rows, which the choice itself never does. For a
benchmark folder written by ``benchmarks/personalization.py --work DIR`` it prints, over the training
sites, the mean held-out accuracy (and worst tenth) of each candidate used for every site, of the
validation choice (what ``fedmeta personalize`` does), and of a perfect per-site choice: the ceiling of
the candidate pool.

    python benchmarks/choice_diagnostic.py DIR/fedprox_1_1 [--algorithm reptile] [--shots 5] [--candidates ditto,linear] [--dump sites.json]

``--dump`` writes, per site, every candidate's mean validation scores, its held-out accuracy, and for the
all-rows fine-tunes (plain, Ditto, heads) also the held-out accuracy when the refit chooses its steps again
on all the training rows, and when it takes 1.5 times the folds' median (the folds' final fits saw two-thirds
of the rows), and each fold's validation scores: enough to compare choice rules without refitting.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from fedmeta.data import load_federation
from fedmeta.evaluate.site_scores import shots_for
from fedmeta.personalize import load_base
from fedmeta.personalize import candidates
from fedmeta.personalize.candidates import CANDIDATES, Candidate, _all_rows_runs, _one, fit_candidates, refit
from fedmeta.personalize.choice import FOLDS, _feasible_shots, held_out_metrics, loss_first, validation_scores, validation_split
from fedmeta.threads import limit_threads


def worst10(values: list[float]) -> float:
    values = sorted(values)
    return float(np.mean(values[: max(1, math.ceil(len(values) / 10))]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--algorithm", default="reptile")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="the kinds fitted (comma-separated; default every one)")
    parser.add_argument("--blend-alphas", default=None, help="the linear model's weights in the blends (comma-separated; default BLEND_ALPHAS)")
    args = parser.parse_args()
    if args.blend_alphas:
        candidates.BLEND_ALPHAS = tuple(float(a) for a in args.blend_alphas.split(","))
    records = []
    limit_threads(1)
    base = load_base(args.folder / "runs" / args.algorithm)
    held_out: dict[str, list[float]] = {}
    chosen, ceiling = [], []
    for site in load_federation(args.folder / "data" / "train", base.config.federation.test_fraction, base.config.federation.seed):
        trained = base.for_schema(site.schema)
        tasks = [t for t in site.tasks if validation_split(site, 0).n_labelled(t, train=True) >= 2]
        by_label: dict[str, list] = {}
        for fold in range(FOLDS):
            rows = validation_split(site, 0, fold)
            shots = _feasible_shots(rows, tasks, shots_for(site, args.shots))
            for c in fit_candidates(trained, rows, tasks, shots, base.adaptation["lr"], 0, args.candidates.split(",")):
                by_label.setdefault(c.label, []).append((c, validation_scores(c.model, rows, tasks)))
        scores, ranks, record = {}, {}, {}
        n_validation = sum(validation_split(site, 0, f).n_labelled(t, train=False) for f in range(FOLDS) for t in tasks)
        for label, items in by_label.items():
            knobs = dict(items[0][0].knobs)
            for k in ("steps", "local_steps"):
                if k in knobs:
                    knobs[k] = int(np.median([c.knobs[k] for c, _ in items]))
            final = refit(Candidate(items[0][0].name, items[0][0].model, knobs), trained, site, site.tasks, 0)
            accs = [v for k, v in held_out_metrics(trained, final.model, site, site.tasks).items() if k.endswith(".personalized.acc")]
            if not accs:
                break
            scores[label] = float(np.mean(accs))
            means = {k: float(np.mean([s[k] for _, s in items if k in s])) for k in ("acc", "loss") if any(k in s for _, s in items)}
            ranks[label] = loss_first(means)
            record[label] = {**means, "held_out": scores[label], "folds": [s for _, s in items]}
            if args.dump and items[0][0].name in ("all_rows", "ditto", "head"):
                specs = [sp for sp in _all_rows_runs(trained, site.tasks) if sp[0] == items[0][0].name and sp[1].get("lambda") == knobs.get("lambda")]
                record[label]["steps"] = knobs["steps"]
                for variant, steps in (("rechosen", None), ("scaled", round(1.5 * knobs["steps"]))):
                    again = _one(trained, specs[0], site, site.tasks, 0, steps)
                    accs = [v for k, v in held_out_metrics(trained, again.model, site, site.tasks).items() if k.endswith(".personalized.acc")]
                    record[label][f"held_out_{variant}"] = float(np.mean(accs))
                    record[label][f"steps_{variant}"] = again.knobs["steps"]
        if len(scores) != len(by_label):
            continue  # no classification task to score
        for label, value in scores.items():
            held_out.setdefault(label, []).append(value)
        labels = list(scores)
        chosen.append(scores[min(labels, key=lambda lab: (ranks[lab], labels.index(lab)))])
        ceiling.append(max(scores.values()))
        records.append({"site": site.name, "n_validation": n_validation, "candidates": record})
    print(f"{args.folder.name}, {len(chosen)} training sites: mean held-out accuracy (worst tenth)")
    for label, values in held_out.items():
        print(f"  every site {label:14s} {np.mean(values):.4f} ({worst10(values):.4f})")
    print(f"  validation choice         {np.mean(chosen):.4f} ({worst10(chosen):.4f})")
    print(f"  perfect per-site choice   {np.mean(ceiling):.4f} ({worst10(ceiling):.4f})")
    if args.dump:
        args.dump.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
