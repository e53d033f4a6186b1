"""Personalization against the personalized-FL state of the art, on fedmeta's own federations.

Runs the evaluation harness (``fedmeta.evaluate``) with its peers on

- the hospital network (47 hospitals, a fifth unseen; accuracy is the mean over the classification tasks),
- FedProx Synthetic(0,0), (0.5,0.5) and (1,1) (30 sites),
- scikit-learn's digits over 20 sites with Dirichlet label skew α in {0.1, 0.5, 5} (PFLlib's recipe),

- the generator families of ``fedmeta.evaluate.families`` (site-specific coefficients, covariate shift,
  label shift, quantity skew, site-specific nonlinear truths, a shared linear truth; 20 sites each),

each at its **selection seeds** (the ones anything may be chosen on: the seven above at seed 0, where
the earlier defaults were picked; the families at ``SELECTION_SEEDS``) or, with ``--fresh``, at its
**fresh seeds** (``FRESH_SEEDS``: for reporting only), and prints, per benchmark, mean site accuracy and the mean of the worst tenth of sites on the training
sites' held-out rows, and how many sites chose each candidate. Methods, all on the same sites, splits,
MLP 64-64 and round budget:

- ``fedmeta``: the base meta-trained with the first of ``--algorithms`` over Flower, then exactly what
  ``fedmeta personalize`` does by default (a candidate chosen per site on validation rows of its training rows);
  ``fedmeta_<algorithm>`` for the others, ``fedmeta_<algorithm>_global`` unadapted;
- what a site builds alone, on all its training rows (``fedmeta.evaluate.local``): ``local_linear``
  (logistic/ridge regression, penalty by cross-validation), ``local_gbm`` (gradient boosting),
  ``local`` (fedmeta's MLP), ``local_cv`` (the one of the three the site's own cross-validation picks:
  the bar to beat) and ``local_best`` (the best of the three on the held-out rows, a reference);
- ``pooled_oracle`` (pooled + a site indicator),
  ``pooled`` (pooled, no indicator), ``fedavg``, ``fedavg_ft`` (+ fine-tuning on all rows);
- ``ditto``, ``fedrep``, ``fedper``, ``fedbabu``, ``apfl``, ``perfedavg``: in-process federated loops
  (``fedmeta.evaluate.peers``), each knob tuned on validation rows with a grid of the size fedmeta gets;
- ``shots_all``: what ``fedmeta personalize --shots all`` gives each training site from the same base as
  ``fedmeta`` (every labelled training row, steps chosen on a validation fifth of them);
- with ``--previous``, ``previous_default``: the default before this one (Ditto and the site's linear model,
  by validation loss), from the same base.

The peers and the pooled oracle with a site indicator run on the seven (``--peers`` adds them to the
families too). With ``--json`` the last line is
``{"benchmarks": {"name@seed": {"methods": {method: {"acc", "worst10"}}, "choices": {...}}}}``.
It prints figures; it asserts nothing.

    python benchmarks/personalization.py [--fresh] [--rounds 20] [--shots 5] [--algorithms reptile] [--only hospitals "fedprox(1,1)"] [--seeds N | --seed S] [--peers] [--json] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedmeta.evaluate import (
    MethodResult,
    aggregate,
    digits_federation_on_disk,
    evaluate,
    fedprox_federation_on_disk,
    hospital_federation_on_disk,
    site_summary,
)
from fedmeta.evaluate.families import FAMILIES, FRESH_SEEDS, SELECTION_SEEDS, family_federation_on_disk
from fedmeta.evaluate.peers import PEERS
from fedmeta.personalize import load_base, personalize
from fedmeta.threads import limit_threads

PEER_BENCHMARKS = {
    "hospitals": lambda out, seed: hospital_federation_on_disk(out, n_sites=47, seed=seed),
    "fedprox(0,0)": lambda out, seed: fedprox_federation_on_disk(out, 0.0, 0.0, seed=seed),
    "fedprox(0.5,0.5)": lambda out, seed: fedprox_federation_on_disk(out, 0.5, 0.5, seed=seed),
    "fedprox(1,1)": lambda out, seed: fedprox_federation_on_disk(out, 1.0, 1.0, seed=seed),
    "digits(α=0.1)": lambda out, seed: digits_federation_on_disk(out, 0.1, seed=seed),
    "digits(α=0.5)": lambda out, seed: digits_federation_on_disk(out, 0.5, seed=seed),
    "digits(α=5)": lambda out, seed: digits_federation_on_disk(out, 5.0, seed=seed),
}
BENCHMARKS = {**PEER_BENCHMARKS, **{family: (lambda out, seed, f=family: family_federation_on_disk(out, f, seed)) for family in FAMILIES}}
#: The seeds anything may be chosen on: the seven were the earlier defaults' (seed 0), the families' their own.
SELECTION = {**{name: (0,) for name in PEER_BENCHMARKS}, **{family: SELECTION_SEEDS for family in FAMILIES}}
CONTRACT = ("fedmeta", "local", "pooled_oracle", "fedavg", "fedavg_ft", *PEERS)


def method_keys(algorithms: tuple[str, ...]) -> dict[str, str]:
    """Benchmark key -> the harness's result name."""
    keys = {"fedmeta": f"fedmeta_{algorithms[0]}", "local_cv": "local_cv", "local_linear": "local_linear", "local_gbm": "local_gbm",
            "local": "local_only", "local_best": "local_best", "pooled_oracle": "pooled_oracle", "fedavg": "fedavg", "fedavg_ft": "fedavg_ft"}
    keys.update({p: p for p in PEERS})
    keys.update({f"fedmeta_{algorithms[0]}_global": f"fedmeta_{algorithms[0]}_global", "pooled": "pooled", "shots_all": "shots_all",
                 "previous_default": "previous_default"})
    for a in algorithms[1:]:
        keys.update({f"fedmeta_{a}": f"fedmeta_{a}", f"fedmeta_{a}_global": f"fedmeta_{a}_global"})
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--algorithms", default="reptile")
    parser.add_argument("--only", nargs="*", default=None, help=f"benchmark names, from {list(BENCHMARKS)}")
    parser.add_argument("--fresh", action="store_true", help="the fresh seeds (for reporting only) instead of the selection seeds")
    parser.add_argument("--seeds", type=int, default=None, help="only the first N seeds of each benchmark")
    parser.add_argument("--seed", type=int, default=None, help="only this one of each benchmark's seeds (e.g. the fresh 1002)")
    parser.add_argument("--peers", action="store_true", help="the personalized-FL peers on the generator families too")
    parser.add_argument("--previous", action="store_true", help="also the previous default (Ditto and the site's linear model, by validation loss)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", default=None, help="folder for the runs (an interrupted benchmark continues there); default: a fresh temporary folder")
    args = parser.parse_args()
    limit_threads(1)
    algorithms = tuple(a for a in args.algorithms.split(",") if a)
    unknown = sorted(set(args.only or []) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    chosen = [b for b in BENCHMARKS if args.only is None or b in args.only]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fedmeta-personalization-"))
    keys = method_keys(algorithms)
    report = {}
    for name in chosen:
        seeds = FRESH_SEEDS if args.fresh else SELECTION[name]
        if args.seed is not None and args.seed not in seeds:
            raise SystemExit(f"--seed {args.seed} is not one of the {'fresh' if args.fresh else 'selection'} seeds of {name}: {list(seeds)}")
        for seed in seeds[: args.seeds] if args.seed is None else (args.seed,):
            started = time.perf_counter()
            label = f"{name}@{seed}"
            out = work / label.replace("(", "_").replace(")", "").replace(",", "_").replace("=", "").replace("α", "a").replace("@", "_seed")
            fed = BENCHMARKS[name](out / "data", seed)
            peers = PEERS if name in PEER_BENCHMARKS or args.peers else ()
            results = evaluate(fed, out, algorithms=algorithms, rounds=args.rounds, shots=args.shots, peers=peers, shots_curve=False,
                               progress=lambda m: print(f"  {label}: {m}", file=sys.stderr, flush=True))
            results["shots_all"] = shots_all(fed, out / "runs" / algorithms[0])
            if args.previous:
                results["previous_default"] = previous_default(fed, out / "runs" / algorithms[0], args.shots)
            methods = {}
            for key, result_name in keys.items():
                if result_name in results:
                    summary = aggregate(results[result_name].seen)
                    methods[key] = {"acc": round(summary["acc"], 4), "worst10": round(summary["worst10_acc"], 4)}
            choices = {key: dict(sorted(_counts(results[r].choices).items())) for key, r in keys.items() if r in results and results[r].choices}
            report[label] = {"methods": methods, "choices": choices, "sites": len(fed.seen), "seconds": round(time.perf_counter() - started)}
            print(f"{label}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    kind = "fresh seeds (for reporting)" if args.fresh else "selection seeds"
    print(f"\nMean site accuracy (worst tenth of sites) on the training sites' held-out rows, {kind}; {args.rounds} rounds, K = {args.shots}\n")
    print("| method | " + " | ".join(report) + " |")
    print("|---|" + "---|" * len(report))
    for key in keys:
        cells = []
        for name, r in report.items():
            m = r["methods"].get(key)
            best = max(v["acc"] for k, v in r["methods"].items() if k not in ("pooled_oracle", "pooled", "local_best"))
            cells.append("—" if m is None else (f"**{m['acc']:.3f}**" if m["acc"] == best else f"{m['acc']:.3f}") + f" ({m['worst10']:.3f})")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\nCandidates chosen per site (fedmeta) and knobs chosen (peers):")
    for name, r in report.items():
        print(f"- {name}: " + "; ".join(f"{k}: {v}" for k, v in r["choices"].items()))
    if args.json:
        print(json.dumps({"benchmarks": report}, ensure_ascii=False))


#: The default before blend: Ditto's fine-tune or the site's own linear model, by validation loss.
PREVIOUS_DEFAULT = ("ditto", "linear")


def previous_default(fed, run: Path, shots: int, seed: int = 0) -> MethodResult:
    """The previous default choice at every training site, from the run's base (same folds, same refits)."""
    from fedmeta.evaluate import shots_for
    from fedmeta.personalize import choice

    base = load_base(run)
    result = MethodResult("previous_default")
    for site in fed.seen:
        adapted = choice.choose_personalization(base.for_schema(site.schema), site, shots=shots_for(site, shots), lr=base.adaptation["lr"],
                                                seed=seed, candidates=PREVIOUS_DEFAULT, rank=choice.loss_first)
        per_task = {t: {k.split(".")[2]: v for k, v in adapted.metrics.items() if k.startswith(f"{t}.personalized.")} for t in adapted.tasks}
        result.seen[site.name] = site_summary(per_task)
        result.choices[site.name] = adapted.steps_selection["chosen"]
    return result


def shots_all(fed, run: Path, seed: int = 0) -> MethodResult:
    """``fedmeta personalize --shots all`` at every training site, from the run's base; scored on the same held-out rows."""
    base = load_base(run)
    result = MethodResult("shots_all")
    for site in fed.seen:
        adapted = personalize(base.for_schema(site.schema), site, shots="all", steps="auto", mode="all", seed=seed)
        per_task = {t: {k.split(".")[2]: v for k, v in adapted.metrics.items() if k.startswith(f"{t}.personalized.")} for t in adapted.tasks}
        result.seen[site.name] = site_summary(per_task)
    return result


def _counts(choices: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in choices.values():
        counts[value] = counts.get(value, 0) + 1
    return counts


if __name__ == "__main__":
    main()
