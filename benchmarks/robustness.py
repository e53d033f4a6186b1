"""The cost of the protections on the hospital federation: DP, robust rules under attack, compression.

Every row is a real training run (``fedmeta train`` in a Flower simulation)
scored by the final evaluation on every site's held-out rows: accuracy is
the example-weighted mean over the classification tasks (readmission,
mortality), of the global model and after K-shot personalization.

- **DP**: 500 hospitals, 50 sampled per round (10%), 20 rounds, clip norm
  0.3 (about the median update norm at the start); the noise multiplier is
  calibrated so the 20 rounds spend epsilon = 8, 4, 1 at delta = 1e-5
  (RDP accountant). Compared with the same run without DP.
- **Byzantine**: 20 hospitals, 4 of them (20%) attackers sending -10x their
  update (``sign_flip``) or N(0, 1) noise; plain mean vs median, trimmed
  mean (20%) and Multi-Krum (f = 4). Compared with the clean mean.
- **Compression**: the same 20 hospitals with int8 and top-k (5%, int8
  values, error feedback) uploads, an int8 broadcast, and top-k uploads
  with an int8 broadcast; bytes are what Flower counted.
- **SecAgg+**: the same 20 hospitals with secure aggregation, for its
  accuracy (quantization) and time.

    python benchmarks/robustness.py [--json] [--quick]

With ``--json`` the last line holds ``dp_eps8_acc_drop``,
``byzantine_robust_acc_drop``, ``byzantine_mean_acc_drop``,
``compression_ratio`` and ``compression_acc_drop`` (drops in accuracy
points, personalized). A run goes on when a site sits a round out (its local
training diverged on every restart) or fails; the JSON line always comes,
with ``sat_out`` and ``restarts`` per run where any happened, and
``failed_runs`` naming each run that did not complete, with its reason (the
figures that need it are then left out).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmeta.fl.privacy import noise_multiplier_for

BASE = """
name = "robustness"
rounds = {rounds}
seed = 0
[federation]
kind = "hospitals"
n_sites = {sites}
seed = 0
[model]
hidden = [32, 32]
[algorithm]
name = "fomaml"
lr = 0.05
adaptation_steps = 3
[local]
steps = 10
lr = 0.05
meta_batch = 8
[server]
optimizer = "sgd"
lr = 1.0
momentum = 0.5
min_sites = 2
fraction_train = {fraction}
fraction_evaluate = {fraction_evaluate}
[evaluation]
every = 1000
shots = 5
steps = 5
[simulation]
cpus_per_site = 1.0
"""

CLASSIFICATION = ("readmission_30d", "mortality")
DELTA = 1e-5
CLIP = 0.3


def run(work: Path, name: str, sites: int, rounds: int, fraction: float, overrides: list[str]) -> dict:
    """Train one configuration; its row (:func:`read_run`)."""
    config = work / f"{name}.toml"
    fraction_evaluate = min(1.0, 100 / sites)
    config.write_text(BASE.format(rounds=rounds, sites=sites, fraction=fraction, fraction_evaluate=fraction_evaluate))
    run_dir = work / name
    args = [sys.executable, "-m", "fedmeta.cli", "train", "--config", str(config), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    return read_run(name, run_dir, result.returncode, result.stdout + result.stderr, time.perf_counter() - started)


#: How `fedmeta train` reports a site's round: ``round 19: site hospital_488 sat out: ...`` (or ``failed: ...``).
SITE_LINE = re.compile(r"^round (\d+): site (\S+) (sat out|failed): (.*)$", re.MULTILINE)


def read_run(name: str, run_dir: Path, returncode: int, output: str, seconds: float) -> dict:
    """One run's row: final accuracies, upload bytes, seconds, and the sites that sat out, failed or restarted.

    A run that left no base model or final evaluation is a row with its reason
    in ``failed`` and no figures. A run that completed is kept even when
    `fedmeta train` ended with exit 1 (a site raised): the sites are listed.
    """
    sites = {"sat out": [], "failed": []}
    for round_, site, outcome, reason in SITE_LINE.findall(output):
        sites[outcome].append({"round": int(round_), "site": site, "reason": reason.strip()})
    row = {"name": name, "seconds": seconds, "sat_out": sites["sat out"], "failed_sites": sites["failed"]}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    evaluations = [r for r in rows if r["site"] == "*" and r["phase"] == "evaluate"]
    if not (run_dir / "base_model.pt").exists() or not evaluations:
        errors = [line.strip() for line in output.splitlines() if line.strip().startswith("error:")]
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        row["failed"] = (errors or lines or [f"fedmeta train exited with {returncode}"])[-1]
        return row
    final = evaluations[-1]
    trained = [r for r in rows if r["site"] == "*" and r["phase"] == "train" and not r.get("skipped")]
    weights = {t: sum(r.get(f"examples.{t}", 0) for r in rows if r["phase"] == "evaluate" and r["site"] != "*" and r["round"] == final["round"]) for t in CLASSIFICATION}
    total = sum(weights.values())

    def acc(kind: str) -> float:
        return sum(final[f"{t}.{kind}.acc"] * weights[t] for t in CLASSIFICATION) / total

    return {
        **row,
        "global_acc": acc("global"),
        "personalized_acc": acc("personalized"),
        "upload_bytes": sum(r.get("upload_bytes", 0) for r in trained),  # none under SecAgg+: the server never sees one site's update
        "broadcast_bytes": sum(r.get("broadcast_bytes", 0) for r in trained),
        "rounds": len(trained),
        "epsilon": trained[-1].get("epsilon") if trained else None,
        "restarts": sum(int(r.get("restarts", 0)) for r in rows if r["phase"] == "train" and r["site"] != "*"),
    }


def completed(row: dict | None) -> bool:
    return row is not None and "failed" not in row


def summary(results: list[dict]) -> dict:
    """The JSON line's figures from the runs that completed, and what the others and their sites went through."""
    done = [r for r in results if completed(r)]
    byzantine = [r for r in done if r["section"] == "byzantine" and "rule" in r and "acc_drop" in r]
    robust = [r for r in byzantine if r["rule"] != "mean"]
    by_name = {r["name"]: r for r in done}
    out = {f"dp_eps{e}_acc_drop": by_name[f"dp_eps{e}"]["acc_drop"] for e in (8, 4, 1) if "acc_drop" in by_name.get(f"dp_eps{e}", {})}
    if robust:
        # The robust figure is the worst attack for the best rule; the mean's is its worst attack.
        worst = {rule: max(r["acc_drop"] for r in robust if r["rule"] == rule) for rule in {r["rule"] for r in robust}}
        out["byzantine_robust_rule"] = min(worst, key=worst.get)
        out["byzantine_robust_acc_drop"] = min(worst.values())
    if any(r["rule"] == "mean" for r in byzantine):
        out["byzantine_mean_acc_drop"] = max(r["acc_drop"] for r in byzantine if r["rule"] == "mean")
    if "acc_drop" in by_name.get("secagg", {}):
        out["secagg_acc_drop"] = by_name["secagg"]["acc_drop"]
        out["secagg_seconds"] = by_name["secagg"]["seconds"]
        out["plain_seconds"] = by_name["clean"]["seconds"]  # a secagg row has a drop only if the clean run completed
    for codec, prefix in (("topk", "compression"), ("int8", "int8")):
        if "ratio" in by_name.get(f"compress_{codec}", {}):
            out[f"{prefix}_ratio"] = by_name[f"compress_{codec}"]["ratio"]
            out[f"{prefix}_acc_drop"] = by_name[f"compress_{codec}"]["acc_drop"]
    for codec in ("broadcast_int8", "topk_broadcast_int8"):
        if "ratio" in by_name.get(f"compress_{codec}", {}):
            row = by_name[f"compress_{codec}"]
            out.update({f"{codec}_ratio": row["broadcast_ratio"], f"{codec}_total_ratio": row["total_ratio"], f"{codec}_acc_drop": row["acc_drop"]})
    sat_out = {r["name"]: [f"{s['site']} (round {s['round']})" for s in r["sat_out"]] for r in results if r.get("sat_out")}
    failed_sites = {r["name"]: [f"{s['site']} (round {s['round']}): {s['reason']}" for s in r["failed_sites"]] for r in results if r.get("failed_sites")}
    restarts = {r["name"]: r["restarts"] for r in done if r.get("restarts")}
    failed_runs = {r["name"]: r["failed"] for r in results if not completed(r)}
    for key, value in (("sat_out", sat_out), ("failed_sites", failed_sites), ("restarts", restarts), ("failed_runs", failed_runs)):
        if value:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer sites and rounds: a smoke test, not the figures")
    parser.add_argument("--sections", default="dp,byzantine,compression,secagg", help="comma-separated subset to run")
    args = parser.parse_args()
    rounds = 5 if args.quick else 20
    dp_sites, dp_sampled = (60, 12) if args.quick else (500, 50)
    sites, attackers = (10, 2) if args.quick else (20, 4)
    attacker_ids = list(range(0, sites, sites // attackers))[:attackers]
    results: list[dict] = []

    def record(section: str, label: str, row: dict, reference: dict | None) -> dict:
        row.update(section=section, label=label)
        results.append(row)
        if not completed(row):
            print(f"{section:12s} {label:34s} failed: {row['failed']}", file=sys.stderr)
            return row
        if completed(reference):
            row["acc_drop"] = 100 * (reference["personalized_acc"] - row["personalized_acc"])
        diverged = f"  {len(row['sat_out'])} sat out, {row['restarts']} restart(s)" if row["sat_out"] or row["restarts"] else ""
        print(f"{section:12s} {label:34s} pers acc {row['personalized_acc']:.3f}  global acc {row['global_acc']:.3f}  {row['seconds']:.0f} s{diverged}", file=sys.stderr)
        return row

    with tempfile.TemporaryDirectory(prefix="fedmeta-robustness-") as tmp:
        work = Path(tmp)
        sections = set(args.sections.split(","))
        # --- differential privacy -------------------------------------------------------------
        fraction = dp_sampled / dp_sites
        dp_clean = record("dp", "no DP", run(work, "dp_clean", dp_sites, rounds, fraction, []), None) if "dp" in sections else None
        for epsilon in (8, 4, 1) if "dp" in sections else ():
            sigma = noise_multiplier_for(epsilon, DELTA, rounds, dp_sampled, dp_sites)
            row = run(work, f"dp_eps{epsilon}", dp_sites, rounds, fraction, [f"privacy.clip_norm={CLIP}", f"privacy.noise_multiplier={sigma}", f"privacy.delta={DELTA}"])
            row["noise_multiplier"] = sigma
            spent = f"{row['epsilon']:.2f}" if completed(row) and row["epsilon"] is not None else f"{epsilon} (target)"
            record("dp", f"epsilon {spent} (sigma {sigma:.2f}, C {CLIP})", row, dp_clean)
        # --- Byzantine sites --------------------------------------------------------------------
        clean = record("byzantine", "no attack, mean", run(work, "clean", sites, rounds, 1.0, []), None)
        rules = {"mean": [], "median": ['aggregation.rule="median"'], "trimmed_mean": ['aggregation.rule="trimmed_mean"', "aggregation.trim_fraction=0.2"],
                 "multikrum": ['aggregation.rule="multikrum"', f"aggregation.byzantine_sites={attackers}"]}
        for attack in ("sign_flip", "noise") if "byzantine" in sections else ():
            for rule, options in rules.items():
                chaos = [f"simulation.byzantine_sites={attacker_ids}", f'simulation.attack="{attack}"', *options]
                row = run(work, f"{attack}_{rule}", sites, rounds, 1.0, chaos)
                row.update(rule=rule, attack=attack)
                record("byzantine", f"{attackers}/{sites} {attack}, {rule}", row, clean)
        # --- compression ----------------------------------------------------------------------------
        if "secagg" in sections:
            row = run(work, "secagg", sites, rounds, 1.0, ["secure.secagg=true"])
            record("secagg", "SecAgg+ (server sees only the sum)", row, clean)
        topk, int8_down = ['compression.upload="topk"', "compression.topk_ratio=0.05"], ['compression.broadcast="int8"']
        codecs = {"int8": ['compression.upload="int8"'], "topk": topk, "broadcast_int8": int8_down, "topk_broadcast_int8": topk + int8_down}
        for codec, options in codecs.items() if "compression" in sections else ():
            row = run(work, f"compress_{codec}", sites, rounds, 1.0, options)
            if not (completed(row) and completed(clean)):
                record("compression", codec, row, clean)
                continue
            row["ratio"] = clean["upload_bytes"] / row["upload_bytes"]
            row["broadcast_ratio"] = clean["broadcast_bytes"] / row["broadcast_bytes"]
            row["total_ratio"] = (clean["upload_bytes"] + clean["broadcast_bytes"]) / (row["upload_bytes"] + row["broadcast_bytes"])
            record("compression", f"{codec} (up {row['ratio']:.1f}x, down {row['broadcast_ratio']:.1f}x fewer bytes)", row, clean)

    print(f"{'section':12s} {'setting':48s} {'pers acc':>8s} {'global acc':>10s} {'drop (pts)':>10s} {'upload MB':>9s} {'bcast MB':>8s} {'s':>5s}")
    for r in results:
        if not completed(r):
            print(f"{r['section']:12s} {r['label']:48s} failed: {r['failed']}")
            continue
        drop = f"{r['acc_drop']:+.1f}" if "acc_drop" in r else "—"
        upload = f"{r['upload_bytes'] / 1e6:.2f}" if r["upload_bytes"] else "—"  # SecAgg+: no single site's bytes to count
        print(f"{r['section']:12s} {r['label']:48s} {r['personalized_acc']:8.3f} {r['global_acc']:10.3f} {drop:>10s} {upload:>9s} "
              f"{r['broadcast_bytes'] / 1e6:8.2f} {r['seconds']:5.0f}")
    if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary(results).items()}))


if __name__ == "__main__":
    main()
