"""The evaluation harness: FedMeta against the alternatives, on the same sites, splits and seeds.

Methods (every one scored on each site's held-out rows):

- ``local_only``: each site trains the same network alone on all its training rows;
- ``local_only_k``: each site fits a scikit-learn model on only its K-shot support rows;
- ``pooled``: one network on all training sites' rows, centralized (what regulation forbids: the reference);
- ``fedavg``: FedAvg over Flower, the global model as is;
- ``fedavg_ft``: FedAvg's model fine-tuned on K shots at each site;
- ``fedmeta_<algorithm>``: meta-trained over Flower, then K-shot personalized at each site.

About 20% of the sites never take part in training (``unseen``): the
methods that produce one model for everybody are scored on them as they are,
the personalizing ones after K-shot adaptation, which is meta-learning's
real promise. Accuracy is the mean over a site's classification tasks;
``worst10`` is the mean of the worst tenth of sites; the gap closed is
``(method - local_only) / (pooled - local_only)``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import pandas as pd

from fedmeta.data import SiteData, hospital_federation_frames, load_federation
from fedmeta.data.schema import Schema, TaskColumn, feature_sums, numeric_schema
from fedmeta.data.synthetic import fedprox_schema, fedprox_synthetic
from fedmeta.files import atomic_write_bytes
from fedmeta.fl.config import RunConfig
from fedmeta.models import MultiTaskModel
from fedmeta.personalize import load_base, personalize, support_sets
from fedmeta.scoring import output_scores, task_scores
from fedmeta.trained import TrainedModel

ALGORITHMS = ("reptile", "fomaml", "maml", "metasgd")
SHOTS_CURVE = (1, 2, 5, 10, 20)
Progress = Callable[[str], None]


@dataclass
class Federation:
    """Sites written as CSV files: the training sites (as Flower's csv federation reads them) and the unseen ones."""

    train_dir: Path
    unseen_dir: Path
    seen: list[SiteData]
    unseen: list[SiteData]
    seed: int
    test_fraction: float = 0.25


def federation_on_disk(
    out: Path, schema: Schema, frames: dict[str, pd.DataFrame], seed: int = 0, unseen_fraction: float = 0.2, test_fraction: float = 0.25
) -> Federation:
    """Write one CSV per site plus the schema; every fifth site (about ``unseen_fraction``) goes to the unseen folder.

    The sites are split by the one rule training and personalization use (:func:`~fedmeta.data.site.held_out_mask`).
    """
    step = max(2, round(1 / unseen_fraction)) if unseen_fraction > 0 else len(frames) + 1
    train_dir, unseen_dir = out / "train", out / "unseen"
    for i, (name, frame) in enumerate(frames.items()):
        folder = unseen_dir if i % step == step - 1 else train_dir
        atomic_write_bytes(folder / f"{name}.csv", frame.to_csv(index=False).encode())
    for folder in (train_dir, unseen_dir):
        schema.save(folder / "schema.json")
    # The sites as training finds them (fedmeta.data.federation): same names, order and held-out rows.
    seen = load_federation(train_dir, test_fraction, seed)
    unseen = load_federation(unseen_dir, test_fraction, seed) if any(unseen_dir.glob("*.csv")) else []
    return Federation(train_dir, unseen_dir, seen, unseen, seed, test_fraction)


def hospital_federation_on_disk(out: Path, n_sites: int, seed: int = 0, unseen_fraction: float = 0.2, test_fraction: float = 0.25) -> Federation:
    """The hospital network (:func:`fedmeta.data.hospital_federation_frames`) as a :class:`Federation`."""
    schema, frames = hospital_federation_frames(n_sites, seed)
    return federation_on_disk(out, schema, frames, seed, unseen_fraction, test_fraction)


def fedprox_federation_on_disk(out: Path, alpha: float, beta: float, n_sites: int = 30, seed: int = 0) -> Federation:
    """FedProx Synthetic(α, β) as CSV sites (features x0..x59, label y), normalized federatedly."""
    sites = fedprox_synthetic(alpha, beta, n_sites, seed)
    schema = fedprox_schema()
    frames = {}
    for site in sites:
        frame = pd.DataFrame(site.x, columns=[f.name for f in schema.features])
        frame["y"] = site.labels["label"].astype(int)
        frames[site.name] = frame
    schema = schema.with_normalization(feature_sums(f, schema) for f in frames.values())
    return federation_on_disk(out, schema, frames, seed)


def digits_federation_on_disk(out: Path, alpha: float, n_sites: int = 20, seed: int = 0, min_rows: int = 30) -> Federation:
    """scikit-learn's bundled digits split over sites by Dirichlet(α) label skew (PFLlib's recipe).

    For each class, its rows are dealt to the sites in Dirichlet(α) proportions; a small α gives each
    site few classes. Drawn again until every site has ``min_rows`` rows.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        assignment = np.empty(len(y), int)
        for c in range(10):
            rows = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites)) * len(rows)).astype(int)[:-1]
            for site, part in enumerate(np.split(rows, cuts)):
                assignment[part] = site
        if np.bincount(assignment, minlength=n_sites).min() >= min_rows:
            break
    else:
        raise ValueError(f"no Dirichlet({alpha}) split of digits gives every one of {n_sites} sites {min_rows} rows")
    task = TaskColumn(name="digit", kind="multiclass", n_classes=10, label="digit")
    schema = numeric_schema(64, [task], name=f"digits-dirichlet-{alpha}")
    schema = schema.model_copy(update={"features": [f.model_copy(update={"name": f"px{j}"}) for j, f in enumerate(schema.features)]})
    frames = {}
    for site in range(n_sites):
        rows = np.flatnonzero(assignment == site)
        frame = pd.DataFrame(x[rows], columns=[f.name for f in schema.features])
        frame["digit"] = y[rows]
        frames[f"site_{site:03d}"] = frame
    schema = schema.with_normalization(feature_sums(f, schema) for f in frames.values())
    return federation_on_disk(out, schema, frames, seed)


# --------------------------------------------------------------------------
# Per-site scores
# --------------------------------------------------------------------------


def shots_for(site: SiteData, shots: int) -> int:
    """K, lowered for a site whose training rows cannot supply K per class (small sites of a label-skewed split)."""
    fits = [site.n_labelled(t, train=True) // (site.schema.task(t).n_classes or 1) for t in site.tasks]
    return max(1, min([shots, *fits]))


def site_summary(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """One site's accuracy and AUC (means over its classification tasks) and regression MSE."""
    accs = [s["acc"] for s in scores.values() if "acc" in s]
    aucs = [s["auc"] for s in scores.values() if "auc" in s]
    mses = [s["mse"] for s in scores.values() if "mse" in s]
    out = {}
    if accs:
        out["acc"] = float(np.mean(accs))
    if aucs:
        out["auc"] = float(np.mean(aucs))
    if mses:
        out["mse"] = float(np.mean(mses))
    return out


def model_scores(trained: TrainedModel, params, site: SiteData) -> dict[str, dict[str, float]]:
    model = trained.module()
    return {t: task_scores(model, params, t, *site.split(t, train=False)) for t in site.tasks if t in trained.tasks}


def aggregate(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over sites, and the mean of the worst tenth of sites by accuracy."""
    out = {}
    for metric in ("acc", "auc", "mse"):
        values = [s[metric] for s in per_site.values() if metric in s]
        if values:
            out[metric] = float(np.mean(values))
    accs = sorted(s["acc"] for s in per_site.values() if "acc" in s)
    if accs:
        out["worst10_acc"] = float(np.mean(accs[: max(1, math.ceil(len(accs) / 10))]))
    return out


# --------------------------------------------------------------------------
# Baselines trained here
# --------------------------------------------------------------------------


def _fit(
    trained: TrainedModel, batches: list[tuple[str, np.ndarray, np.ndarray]], steps: int, lr: float, seed: int, batch_rows: int = 256, check_every: int = 50
) -> dict[str, torch.Tensor]:
    """Adam on minibatches of every task in turn, early-stopped on a fifth of the rows held back for validation.

    Without early stopping the pooled oracle overfits: 1500 steps scored 0.759 mean site accuracy where 500
    scored 0.789 on 8 hospitals. Every baseline gets the same treatment.
    """
    from fedmeta.meta.inner import make_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = trained.module().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    losses = {t: make_loss(model, t) for t, _, _ in batches}
    fit, valid = [], []
    for task, x, y in batches:
        order = rng.permutation(len(y))
        cut = max(1, len(y) // 5) if len(y) >= 10 else 0
        fit.append((task, x[order[cut:]], y[order[cut:]]))
        if cut:
            valid.append((task, torch.from_numpy(x[order[:cut]]), torch.from_numpy(y[order[:cut]])))
    params = dict(model.named_parameters())

    def validation_loss() -> float:
        with torch.no_grad():
            return sum(float(losses[t](params, x, y, torch.ones(len(y)))) for t, x, y in valid)

    best, best_loss = {k: v.detach().clone() for k, v in params.items()}, validation_loss() if valid else math.inf
    for step in range(1, steps + 1):
        task, x, y = fit[step % len(fit)]
        rows = rng.choice(len(y), min(batch_rows, len(y)), replace=False)
        optimizer.zero_grad()
        losses[task](params, torch.from_numpy(x[rows]), torch.from_numpy(y[rows]), torch.ones(len(rows))).backward()
        optimizer.step()
        if valid and step % check_every == 0:
            current = validation_loss()
            if current < best_loss:
                best, best_loss = {k: v.detach().clone() for k, v in params.items()}, current
    return best if valid else {k: v.detach().clone() for k, v in params.items()}


def local_only(site: SiteData, hidden: tuple[int, ...], steps: int = 300, lr: float = 3e-3, seed: int = 0) -> dict[str, dict[str, float]]:
    trained = TrainedModel.initial(site.schema, hidden, seed)
    params = _fit(trained, [(t, *site.split(t, train=True)) for t in site.tasks], steps, lr, seed)
    return model_scores(trained, params, site)


def local_only_k(site: SiteData, shots: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Logistic (or ridge) regression on the very support rows K-shot personalization uses."""
    from sklearn.linear_model import LogisticRegression, Ridge

    scores = {}
    supports = support_sets(site, site.tasks, shots, seed)
    for task, (x, y, w) in supports.items():
        keep = w.numpy() > 0
        x, y, w = x.numpy()[keep], y.numpy()[keep], w.numpy()[keep]
        x_test, y_test = site.split(task, train=False)
        spec = site.schema.task(task)
        if not spec.is_classification:
            scores[task] = output_scores(Ridge(alpha=1.0).fit(x, y, sample_weight=w).predict(x_test).astype(np.float32)[:, None], y_test, False)
            continue
        if len(np.unique(y)) < 2:
            logits = np.full((len(x_test), spec.n_classes), -30.0, np.float32)
            logits[:, int(y[0])] = 0.0
        else:
            clf = LogisticRegression(max_iter=1000).fit(x, y, sample_weight=w)
            logits = np.full((len(x_test), spec.n_classes), -30.0, np.float32)
            logits[:, clf.classes_] = clf.predict_log_proba(x_test)
        scores[task] = output_scores(logits, y_test, True)
    return scores


def pooled(sites: list[SiteData], hidden: tuple[int, ...], steps: int = 1500, lr: float = 3e-3, seed: int = 0) -> TrainedModel:
    """The centralized oracle: one network on every training site's rows."""
    schema = sites[0].schema
    batches = []
    for task in [t.name for t in schema.tasks]:
        parts = [s.split(task, train=True) for s in sites if task in s.tasks]
        if parts:
            batches.append((task, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    trained = TrainedModel.initial(schema, hidden, seed)
    return TrainedModel(schema, hidden, {"params": _fit(trained, batches, steps, lr, seed)})


# --------------------------------------------------------------------------
# Federated methods
# --------------------------------------------------------------------------


def run_config(fed: Federation, algorithm: str, rounds: int, hidden: tuple[int, ...], seed: int) -> RunConfig:
    """The training run of one method: the same federation, model, rounds and local work for all."""
    return RunConfig.from_dict(
        {
            "name": algorithm,
            "rounds": rounds,
            "seed": seed,
            "federation": {"kind": "csv", "data_dir": str(fed.train_dir), "n_sites": len(fed.seen), "seed": fed.seed, "test_fraction": fed.test_fraction},
            "model": {"hidden": list(hidden)},
            "algorithm": {"name": algorithm, "lr": 0.05, "adaptation_steps": 3},
            "local": {"steps": 10, "lr": 0.05, "meta_batch": 8, "shots": 5, "query_size": 16},
            "server": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.5, "min_sites": min(2, len(fed.seen))},
            "evaluation": {"every": max(1, rounds // 4), "shots": 5, "steps": 5},
            "simulation": {"cpus_per_site": 0.5},
        }
    )


def upload_bytes(state: dict, rounds: int, sites: int) -> int:
    """Bytes a run moves: every site downloads and uploads the float32 state every round (an upper bound: sites send only their tasks' heads)."""
    n = sum(t.numel() for group in state.values() for t in group.values())
    return int(n * 4 * 2 * rounds * sites)


@dataclass
class MethodResult:
    name: str
    seen: dict[str, dict[str, float]] = field(default_factory=dict)
    unseen: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes: int | None = None
    seconds: float = 0.0
    shots_curve: dict[int, float] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"seen": aggregate(self.seen), "unseen": aggregate(self.unseen), "bytes": self.bytes, "seconds": round(self.seconds, 2)}
        if self.shots_curve:
            out["shots_curve"] = {str(k): v for k, v in self.shots_curve.items()}
        return out


class Stages:
    """Finished stages of an evaluation, one JSON file per method result, so an interrupted run continues where it stopped."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, *names: str) -> list[MethodResult] | None:
        """The results named, if every one of them was saved."""
        paths = [self.folder / f"{name}.json" for name in names]
        if not all(p.exists() for p in paths):
            return None
        results = []
        for path in paths:
            raw = json.loads(path.read_text())
            raw["shots_curve"] = {int(k): v for k, v in raw.get("shots_curve", {}).items()}
            results.append(MethodResult(**raw))
        return results

    def put(self, *results: MethodResult) -> None:
        from fedmeta.files import atomic_write_json

        for r in results:
            atomic_write_json(self.folder / f"{r.name}.json", {**r.__dict__, "shots_curve": {str(k): v for k, v in r.shots_curve.items()}})


def federated(
    fed: Federation, algorithm: str, rounds: int, hidden: tuple[int, ...], shots: int, runs_dir: Path, seed: int, progress: Progress, observer=None
) -> list[MethodResult]:
    """Train over Flower, then score: FedAvg as is and fine-tuned; a meta-learner personalized."""
    from fedmeta.fl.simulation import run_simulation

    started = time.perf_counter()
    config = run_config(fed, algorithm, rounds, hidden, seed)
    run_dir = runs_dir / algorithm
    if not (run_dir / "base_model.pt").exists():
        resume = (run_dir / "checkpoint.pt").exists()  # an interrupted run continues from its last round
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        progress(f"training {algorithm} over Flower: {len(fed.seen)} sites, {rounds} rounds" + (" (resuming)" if resume else ""))
        run_simulation(config, run_dir, resume=resume, observer=observer() if observer else None)
    base = load_base(run_dir)
    adaptation = base.adaptation
    trained_seconds = time.perf_counter() - started
    name = "fedmeta_" + algorithm if algorithm != "fedavg" else "fedavg_ft"
    tuned = MethodResult(name, bytes=upload_bytes(base.state, rounds, len(fed.seen)))
    plain = MethodResult("fedavg" if algorithm == "fedavg" else name + "_global", bytes=tuned.bytes)
    progress(f"personalizing every site with K={shots} ({name})")
    for group, sites in (("seen", fed.seen), ("unseen", fed.unseen)):
        for site in sites:
            trained = base.for_schema(site.schema)
            result = personalize(trained, site, shots=shots_for(site, shots), steps="auto", lr=adaptation["lr"], seed=seed)
            for target, label in ((tuned, "personalized"), (plain, "base")):
                per_task = {t: {k.split(".")[2]: v for k, v in result.metrics.items() if k.startswith(f"{t}.{label}.")} for t in result.tasks}
                getattr(target, group)[site.name] = site_summary(per_task)
    for k in SHOTS_CURVE:
        accs = []
        for site in fed.seen:
            result = personalize(base.for_schema(site.schema), site, shots=shots_for(site, k), steps="auto", lr=adaptation["lr"], seed=seed)
            accs.append(site_summary({t: {"acc": v} for t in result.tasks for m, v in result.metrics.items() if m == f"{t}.personalized.acc"}).get("acc"))
        tuned.shots_curve[k] = float(np.mean([a for a in accs if a is not None]))
    tuned.seconds = time.perf_counter() - started
    plain.seconds = trained_seconds
    return [plain, tuned]


def evaluate(
    fed: Federation,
    out: Path,
    algorithms: tuple[str, ...] = ALGORITHMS,
    rounds: int = 20,
    hidden: tuple[int, ...] = (64, 64),
    shots: int = 10,
    seed: int = 0,
    progress: Progress = lambda message: None,
    observer=None,
) -> dict[str, MethodResult]:
    """Every method on ``fed``; writes ``results.json`` to ``out`` and returns the results by method."""
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out / "stages")
    results: dict[str, MethodResult] = {}
    done = stages.get("local_only", "local_only_k")
    if done is None:
        started = time.perf_counter()
        progress(f"local-only: each of {len(fed.seen) + len(fed.unseen)} sites trains alone")
        local = MethodResult("local_only")
        local_k = MethodResult("local_only_k")
        for group, sites in (("seen", fed.seen), ("unseen", fed.unseen)):
            for i, site in enumerate(sites):
                getattr(local, group)[site.name] = site_summary(local_only(site, hidden, seed=seed + i))
                getattr(local_k, group)[site.name] = site_summary(local_only_k(site, shots_for(site, shots), seed=seed))
        local.seconds = time.perf_counter() - started
        for k in SHOTS_CURVE:
            local_k.shots_curve[k] = float(np.mean([a for a in (site_summary(local_only_k(s, shots_for(s, k), seed=seed)).get("acc") for s in fed.seen) if a is not None]))
        stages.put(local, local_k)
        done = [local, local_k]
    results.update({r.name: r for r in done})
    done = stages.get("pooled")
    if done is None:
        progress("pooled oracle: all training rows in one place")
        started = time.perf_counter()
        oracle = pooled(fed.seen, hidden, seed=seed)
        pool = MethodResult("pooled")
        for group, sites in (("seen", fed.seen), ("unseen", fed.unseen)):
            for site in sites:
                getattr(pool, group)[site.name] = site_summary(model_scores(oracle, oracle.params, site))
        pool.seconds = time.perf_counter() - started
        stages.put(pool)
        done = [pool]
    results["pooled"] = done[0]
    for algorithm in ("fedavg", *algorithms):
        names = ("fedavg", "fedavg_ft") if algorithm == "fedavg" else (f"fedmeta_{algorithm}_global", f"fedmeta_{algorithm}")
        done = stages.get(*names)
        if done is None:
            done = federated(fed, algorithm, rounds, hidden, shots, out / "runs", seed, progress, observer)
            stages.put(*done)
        results.update({r.name: r for r in done})
    payload = {"shots": shots, "rounds": rounds, "sites": {"seen": len(fed.seen), "unseen": len(fed.unseen)}, "methods": {}}
    for name, r in results.items():
        payload["methods"][name] = {**r.summary(), "per_site": {"seen": r.seen, "unseen": r.unseen}}
    from fedmeta.files import atomic_write_json

    atomic_write_json(out / "results.json", payload)
    return results


def _gap(methods: dict, name: str) -> float | None:
    local = methods.get("local_only", {}).get("seen", {}).get("acc")
    oracle = methods.get("pooled", {}).get("seen", {}).get("acc")
    value = methods[name]["seen"].get("acc")
    if None in (local, oracle, value) or oracle - local < 1e-9:
        return None  # no gap to close: local-only already matches or beats the pooled oracle
    return (value - local) / (oracle - local)


def gap_closed(results: dict[str, MethodResult], name: str) -> float | None:
    return _gap({n: r.summary() for n, r in results.items()}, name)


def method_order(name: str) -> tuple[int, str]:
    """Baselines first, then FedAvg, then each FedMeta algorithm adapted and, after it, unadapted."""
    fixed = ["local_only", "local_only_k", "pooled", "fedavg", "fedavg_ft"]
    return (fixed.index(name), "") if name in fixed else (len(fixed), name.removesuffix("_global") + ("~" if name.endswith("_global") else ""))


def method_label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    algorithm = name.removeprefix("fedmeta_")
    if algorithm.endswith("_global"):
        return f"FedMeta {algorithm.removesuffix('_global')}, no adaptation"
    return f"FedMeta {algorithm} + K-shot"


LABELS = {
    "local_only": "local only (all own rows)",
    "local_only_k": "local only (K shots, scikit-learn)",
    "pooled": "pooled oracle (centralized)",
    "fedavg": "FedAvg",
    "fedavg_ft": "FedAvg + K-shot fine-tuning",
}


RESULT_COLUMNS = ("method", "accuracy", "worst 10%", "AUC", "LOS/regression MSE", "unseen sites: accuracy", "unseen: worst 10%", "gap closed", "MB moved")


def results_rows(results: dict) -> list[list[str]]:
    """The rows of the results table (one per method, cells as printed) from ``results.json``: report and CLI print these."""
    methods = results["methods"]
    rows = []
    for name in sorted(methods, key=method_order):
        r = methods[name]
        seen, unseen = r["seen"], r["unseen"]
        gap = _gap(methods, name)

        def cell(d, k):
            return f"{d[k]:.3f}" if k in d else "—"

        moved = "—" if r.get("bytes") is None else f"{r['bytes'] / 1e6:.1f}"
        closed = "—" if gap is None else f"{gap:.0%}"
        rows.append([method_label(name), cell(seen, "acc"), cell(seen, "worst10_acc"), cell(seen, "auc"), cell(seen, "mse"),
                     cell(unseen, "acc"), cell(unseen, "worst10_acc"), closed, moved])
    return rows


def results_table_from_json(results: dict) -> str:
    """A markdown table from ``results.json``: accuracy (mean, worst 10%), AUC, MSE, unseen sites, gap closed, MB moved."""
    lines = ["| " + " | ".join(RESULT_COLUMNS) + " |", "|" + "---|" * len(RESULT_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in results_rows(results)]
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())
