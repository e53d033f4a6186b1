"""Personalization across federations: where it beats FedAvg, and where it does not.

Runs the evaluation harness (``fedmeta.evaluate``: local-only, local-only on K shots, pooled, FedAvg,
FedAvg + K-shot fine-tuning, FedMeta algorithms + K-shot) on

- the hospital network (47 hospitals, a fifth unseen),
- FedProx Synthetic(0,0), (0.5,0.5) and (1,1) (30 sites),
- scikit-learn's digits over 20 sites with Dirichlet label skew α in {0.1, 0.5, 5} (PFLlib's recipe),

and prints a markdown table of mean site accuracy on the training sites' held-out rows. With ``--json``
the last line maps ``benchmark/method`` to that accuracy.

    python benchmarks/personalization.py [--rounds 20] [--shots 5] [--algorithms fomaml,reptile] [--only hospitals "fedprox(1,1)"] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedmeta.evaluate import (
    aggregate,
    digits_federation_on_disk,
    evaluate,
    fedprox_federation_on_disk,
    hospital_federation_on_disk,
    method_label,
    method_order,
)

BENCHMARKS = {
    "hospitals": lambda out: hospital_federation_on_disk(out, n_sites=47),
    "fedprox(0,0)": lambda out: fedprox_federation_on_disk(out, 0.0, 0.0),
    "fedprox(0.5,0.5)": lambda out: fedprox_federation_on_disk(out, 0.5, 0.5),
    "fedprox(1,1)": lambda out: fedprox_federation_on_disk(out, 1.0, 1.0),
    "digits(α=0.1)": lambda out: digits_federation_on_disk(out, 0.1),
    "digits(α=0.5)": lambda out: digits_federation_on_disk(out, 0.5),
    "digits(α=5)": lambda out: digits_federation_on_disk(out, 5.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--algorithms", default="fomaml,reptile")
    parser.add_argument("--only", nargs="*", default=None, help=f"benchmark names, from {list(BENCHMARKS)}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    algorithms = tuple(a for a in args.algorithms.split(",") if a)
    unknown = sorted(set(args.only or []) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    chosen = [b for b in BENCHMARKS if args.only is None or b in args.only]
    work = Path(tempfile.mkdtemp(prefix="fedmeta-personalization-"))
    table, flat = {}, {}
    for name in chosen:
        started = time.perf_counter()
        out = work / name.replace("(", "_").replace(")", "").replace(",", "_").replace("=", "")
        fed = BENCHMARKS[name](out / "data")
        results = evaluate(fed, out, algorithms=algorithms, rounds=args.rounds, shots=args.shots)
        table[name] = {method: aggregate(r.seen).get("acc") for method, r in results.items()}
        table[name]["unseen:" + "fedavg"] = aggregate(results["fedavg"].unseen).get("acc")
        for method, value in table[name].items():
            flat[f"{name}/{method}"] = None if value is None else round(value, 4)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    methods = sorted((m for m in next(iter(table.values())) if not m.startswith("unseen:")), key=method_order)
    header = ["benchmark"] + [method_label(m) for m in methods]
    print(f"\nMean site accuracy, held-out rows of the training sites; {args.rounds} rounds, K = {args.shots}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in table.items():
        best = max(v for v in row.values() if v is not None)
        cells = [f"**{row[m]:.3f}**" if row[m] == best else f"{row[m]:.3f}" for m in methods]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        print(json.dumps(flat))


if __name__ == "__main__":
    main()
