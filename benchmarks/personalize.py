"""Personalization on the hospital federation: base vs personalized vs a local-only model, and seconds per site.

After a short training run (``examples/hospitals.toml`` by default, trained with the CLI unless
``--run-dir`` already holds a finished run), for every site and K in {5, 10, 20}:

- the base model on the site's held-out rows;
- the personalized model (``fedmeta.personalize.personalize`` with the run's adaptation settings);
- a scikit-learn model trained only on the same K-shot support rows (logistic regression, or ridge
  regression for length of stay), with the same row weights;
- wall time of personalization plus publishing (ONNX export with its parity check, manifest,
  registry entry) per site.

Accuracy averages over sites and classification tasks; MSE is in target standard deviations.

    python benchmarks/personalize.py [--config examples/hospitals.toml] [--run-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge

from fedmeta.data import hospital_federation
from fedmeta.personalize import support_sets, load_base, personalize, publish, register_base
from fedmeta.registry import SiteHome
from fedmeta.scoring import output_scores

SHOTS = (5, 10, 20)


def local_only(site, task: str, support, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """A scikit-learn model fit on the K-shot support rows alone."""
    x, y, w = (t.numpy() for t in support)
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    spec = site.schema.task(task)
    if not spec.is_classification:
        pred = Ridge(alpha=1.0).fit(x, y, sample_weight=w).predict(x_test)
        return output_scores(np.asarray(pred, np.float32)[:, None], y_test, False)
    model = LogisticRegression(max_iter=1000).fit(x, y, sample_weight=w)
    logits = np.full((len(x_test), spec.n_classes), -30.0, np.float32)
    logits[:, model.classes_] = model.predict_log_proba(x_test)  # classes absent from the support get ~0 probability
    return output_scores(logits, y_test, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/hospitals.toml")
    parser.add_argument("--run-dir", default=None, help="a finished run to reuse (default: train one in a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedmeta-personalize-"))
    run_dir = Path(args.run_dir) if args.run_dir else work / "run"
    if not (run_dir / "base_model.pt").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fedmeta.cli", "train", "--config", args.config, "--run-dir", str(run_dir)], check=True, capture_output=True)
        print(f"trained {run_dir} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    base = load_base(run_dir)
    config = base.config
    fed = config.federation
    if fed.kind != "hospitals":
        raise SystemExit(f"{args.config}: this benchmark runs on the hospital federation, not {fed.kind!r}")
    sites = hospital_federation(fed.n_sites, fed.seed, fed.test_fraction)  # the sites the run trained on, same held-out rows
    adaptation = base.adaptation
    home = SiteHome(work / "site-home")
    base_version = register_base(home, base)

    rows = []  # one per (K, site, task, method)
    seconds = {k: [] for k in SHOTS}
    for shots in SHOTS:
        for site in sites:
            trained = base.for_schema(site.schema)
            started = time.perf_counter()
            result = personalize(trained, site, shots=shots, steps=adaptation["steps"], lr=adaptation["lr"], seed=0)
            publish(home, result.model, "personalized", site.name, base_version, base_version, result.metrics, {"site": site.name}, {}, shots=shots, feature_ranges=site.feature_ranges())
            seconds[shots].append(time.perf_counter() - started)
            supports = support_sets(site, result.tasks, shots, seed=0)  # the very rows personalization used
            for task in (t for t in result.tasks if t in site.scored_tasks):
                x_test, y_test = site.split(task, train=False)
                scores = {
                    "base": {m: result.metrics[f"{task}.base.{m}"] for m in ("acc", "auc", "mse") if f"{task}.base.{m}" in result.metrics},
                    "personalized": {m: result.metrics[f"{task}.personalized.{m}"] for m in ("acc", "auc", "mse") if f"{task}.personalized.{m}" in result.metrics},
                    "local_only": local_only(site, task, supports[task], x_test, y_test),
                }
                for method, values in scores.items():
                    rows.append({"shots": shots, "site": site.name, "task": task, "method": method, **values})

    def mean(metric: str, shots: int, method: str, task: str | None = None) -> float:
        values = [r[metric] for r in rows if r["shots"] == shots and r["method"] == method and metric in r and (task is None or r["task"] == task)]
        return float(np.mean(values)) if values else float("nan")

    methods = ("base", "personalized", "local_only")
    tasks = sorted({r["task"] for r in rows})
    print(f"\n{len(sites)} hospital sites, run {base.run_id} ({config.algorithm.name}, {config.rounds} rounds); "
          f"adaptation {adaptation['steps']} steps at lr {adaptation['lr']}; held-out rows of every site\n")
    print("| K | task | metric | base | personalized | local-only (sklearn, K shots) |")
    print("|---|---|---|---|---|---|")
    for shots in SHOTS:
        for task in tasks:
            for metric in ("acc", "auc", "mse"):
                values = [mean(metric, shots, m, task) for m in methods]
                if not np.isnan(values[1]):
                    print(f"| {shots} | {task} | {metric} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
        print(f"| {shots} | **all classification** | acc | " + " | ".join(f"{mean('acc', shots, m):.4f}" for m in methods) + " |")
    print()
    for shots in SHOTS:
        s = seconds[shots]
        print(f"K={shots}: personalize + export + register {np.mean(s):.3f} s per site (max {np.max(s):.3f} s)")
    summary = {
        "personalized_acc": round(mean("acc", 5, "personalized"), 4),
        "base_acc": round(mean("acc", 5, "base"), 4),
        "local_only_acc": round(mean("acc", 5, "local_only"), 4),
        "seconds_per_site": round(float(np.mean(seconds[5])), 4),
        "by_shots": {
            str(k): {m: round(mean("acc", k, m), 4) for m in methods} | {"seconds_per_site": round(float(np.mean(seconds[k])), 4)} for k in SHOTS
        },
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
