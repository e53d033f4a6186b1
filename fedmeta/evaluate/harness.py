"""The harness: train every method on the same federation, score every site, save each finished stage."""

from __future__ import annotations

import json
import shutil
from collections import Counter
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmeta.evaluate.baselines import local_only_k, pooled
from fedmeta.evaluate.local import local_baselines
from fedmeta.evaluate.federations import Federation
from fedmeta.evaluate.site_scores import aggregate, model_scores, shots_for, site_summary
from fedmeta.fl.config import RunConfig
from fedmeta.personalize import Personalization, choose_personalization, load_base, personalize
from fedmeta.personalize.candidates import fit_all_rows_candidate
from fedmeta.personalize.choice import held_out_metrics

ALGORITHMS = ("reptile", "fomaml", "maml", "metasgd")
SHOTS_CURVE = (1, 2, 5, 10, 20)
Progress = Callable[[str], None]


def each(progress: Progress, items, what: str):
    """``items``, through ``progress.each`` when the progress has one (a bar, :func:`fedmeta.cli.output.stage_progress`)."""
    over = getattr(progress, "each", None)
    return over(items, what) if over is not None else items


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
            "simulation": {"cpus_per_site": 1.0},
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
    choices: dict[str, str] = field(default_factory=dict)  # site -> the candidate (or peer knob) chosen on validation rows

    def summary(self) -> dict:
        out = {"seen": aggregate(self.seen), "unseen": aggregate(self.unseen), "bytes": self.bytes, "seconds": round(self.seconds, 2)}
        if self.choices:
            out["choices"] = dict(Counter(self.choices.values()))
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
    fed: Federation, algorithm: str, rounds: int, hidden: tuple[int, ...], shots: int, runs_dir: Path, seed: int, progress: Progress, observer=None,
    shots_curve: bool = True, keep: dict[str, Personalization] | None = None,
) -> list[MethodResult]:
    """Train over Flower, then score: FedAvg as is and fine-tuned; a meta-learner personalized.

    ``keep`` receives each site's personalization (its model included), so that what is
    registered is exactly what was scored.
    """
    from fedmeta.fl.simulation import run_simulation

    started = time.perf_counter()
    config = run_config(fed, algorithm, rounds, hidden, seed)
    run_dir = runs_dir / algorithm
    if not (run_dir / "base_model.pt").exists():
        resume = (run_dir / "checkpoint.pt").exists()  # an interrupted run continues from its last round
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        progress(f"training {algorithm} over Flower: {len(fed.seen)} sites, {rounds} rounds" + (" (resuming)" if resume else ""))
        run_simulation(config, run_dir, resume=resume, observer=observer() if observer else None, accept_review=bool(fed.review_accepted))
    base = load_base(run_dir)
    adaptation = base.adaptation
    trained_seconds = time.perf_counter() - started
    name = "fedmeta_" + algorithm if algorithm != "fedavg" else "fedavg_ft"
    tuned = MethodResult(name, bytes=upload_bytes(base.state, rounds, len(fed.seen)))
    plain = MethodResult("fedavg" if algorithm == "fedavg" else name + "_global", bytes=tuned.bytes)
    how = "fine-tuning on all rows" if algorithm == "fedavg" else "the default personalization (a candidate chosen per site)"
    progress(f"personalizing every site: {how} ({name})")
    every = [(group, site) for group, sites in (("seen", fed.seen), ("unseen", fed.unseen)) for site in sites]
    for group, site in each(progress, every, f"personalizing ({name})"):
        trained = base.for_schema(site.schema)
        if algorithm == "fedavg":
            # FedAvg + fine-tuning on every labelled training row, early-stopped (the all-rows candidate, refit on all rows).
            model = fit_all_rows_candidate(trained, site, site.tasks, seed).model
            result = Personalization(model, held_out_metrics(trained, model, site, site.tasks), site.tasks, "all", 0, 0.0, "all", seed, 0.0)
        else:
            # Exactly what `fedmeta personalize` does with no --mode.
            result = choose_personalization(trained, site, shots=shots_for(site, shots), lr=adaptation["lr"], seed=seed)
            tuned.choices[site.name] = result.steps_selection["chosen"]
            if keep is not None:
                keep[site.name] = result
        for target, label in ((tuned, "personalized"), (plain, "base")):
            per_task = {t: {k.split(".")[2]: v for k, v in result.metrics.items() if k.startswith(f"{t}.{label}.")} for t in result.tasks}
            getattr(target, group)[site.name] = site_summary(per_task)
    for k in each(progress, SHOTS_CURVE, f"K-shot curve ({name}), K = {', '.join(map(str, SHOTS_CURVE))}") if shots_curve and algorithm != "fedavg" else ():
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
    peers: tuple[str, ...] = (),
    shots_curve: bool = True,
    keep: dict[str, Personalization] | None = None,
) -> dict[str, MethodResult]:
    """Every method on ``fed``; writes ``results.json`` to ``out`` and returns the results by method.

    ``keep`` receives the first algorithm's personalization of each site it
    scores in this call (none for a stage finished by an earlier, interrupted call).

    ``peers`` adds personalized-FL peers (:mod:`fedmeta.evaluate.peers`) and
    the fair pooled oracle (pooled with a site indicator), scored on the
    training sites.
    """
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out / "stages")
    results: dict[str, MethodResult] = {}
    names = ("local_only", "local_only_k", "local_linear", "local_gbm", "local_cv", "local_best")
    done = stages.get(*names)
    if done is None:
        started = time.perf_counter()
        progress(f"local-only: each of {len(fed.seen) + len(fed.unseen)} sites trains alone (MLP, logistic/ridge, gradient boosting)")
        local = {name: MethodResult(name) for name in names}
        every = [(group, i, site) for group, sites in (("seen", fed.seen), ("unseen", fed.unseen)) for i, site in enumerate(sites)]
        for group, i, site in each(progress, every, "local-only"):
            alone = local_baselines(site, hidden, seed=seed + i)
            for name in names:
                if name in alone:
                    getattr(local[name], group)[site.name] = alone[name]
            local["local_cv"].choices[site.name] = alone["local_cv_choice"]
            getattr(local["local_only_k"], group)[site.name] = site_summary(local_only_k(site, shots_for(site, shots), seed=seed))
        for result in local.values():
            result.seconds = time.perf_counter() - started
        for k in SHOTS_CURVE if shots_curve else ():
            local["local_only_k"].shots_curve[k] = float(np.mean([a for a in (site_summary(local_only_k(s, shots_for(s, k), seed=seed)).get("acc") for s in fed.seen) if a is not None]))
        done = list(local.values())
        stages.put(*done)
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
            done = federated(fed, algorithm, rounds, hidden, shots, out / "runs", seed, progress, observer, shots_curve,
                             keep if algorithms and algorithm == algorithms[0] else None)
            stages.put(*done)
        results.update({r.name: r for r in done})
    if peers:
        results.update(_peers(fed, peers, rounds, hidden, seed, stages, progress))
    payload = {"shots": shots, "rounds": rounds, "sites": {"seen": len(fed.seen), "unseen": len(fed.unseen)}, "methods": {},
               "held_out_rows": {s.name: int(s.test_mask.sum()) for s in (*fed.seen, *fed.unseen)}}  # what each site's scores rest on
    for name, r in results.items():
        payload["methods"][name] = {**r.summary(), "per_site": {"seen": r.seen, "unseen": r.unseen}}
    from fedmeta.files import atomic_write_json

    atomic_write_json(out / "results.json", payload)
    return results


def _peers(fed: Federation, peers: tuple[str, ...], rounds: int, hidden: tuple[int, ...], seed: int, stages: Stages, progress: Progress) -> dict[str, MethodResult]:
    """The fair pooled oracle and each peer on the training sites, each a stage of its own."""
    from fedmeta.evaluate.baselines import pooled_oracle
    from fedmeta.evaluate.peers import Budget, tune_and_train
    from fedmeta.trained import TrainedModel

    results = {}
    done = stages.get("pooled_oracle")
    if done is None:
        progress("pooled oracle with a site indicator")
        started = time.perf_counter()
        oracle = MethodResult("pooled_oracle", seen={name: site_summary(s) for name, s in pooled_oracle(fed.seen, hidden, seed=seed).items()})
        oracle.seconds = time.perf_counter() - started
        stages.put(oracle)
        done = [oracle]
    results["pooled_oracle"] = done[0]
    local_steps = run_config(fed, "fedavg", rounds, hidden, seed).local.steps
    budget = Budget(rounds=rounds, local_steps=local_steps, hidden=hidden)
    template = TrainedModel.initial(fed.seen[0].schema, hidden, seed)
    for peer in peers:
        done = stages.get(peer)
        if done is None:
            progress(f"peer {peer}: {rounds} rounds in process, knob tuned on validation rows")
            started = time.perf_counter()
            params, knob, scored = tune_and_train(peer, fed.seen, template, budget, seed)
            result = MethodResult(peer, seen={s.name: site_summary(model_scores(template, params[s.name], s)) for s in fed.seen})
            result.choices = {s.name: f"{knob}" for s in fed.seen}
            result.seconds = time.perf_counter() - started
            stages.put(result)
            done = [result]
            progress(f"peer {peer}: knob {knob} (validation accuracy by knob {scored})")
        results[peer] = done[0]
    return results
