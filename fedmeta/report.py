"""Reports people can look at: ``report.md`` with PNG plots, from an evaluation or demo folder.

Reads ``results.json`` and the training runs under ``runs/`` and draws
(matplotlib, headless):

- ``rounds.png``: training loss and evaluated accuracy per round, per run: every run's global
  model and the same model after the same K-shot adaptation, scored by the same sites;
- ``gains.png``: each site's accuracy gain of the personalized model over the global one, sorted
  and named, unseen sites marked;
- ``shots.png``: mean site accuracy against the number of shots K;
- ``communication.png``: accuracy against megabytes moved, per run.

``fedmeta report FOLDER`` regenerates it all.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on a site's server
import matplotlib.pyplot as plt  # noqa: E402

from fedmeta.evaluate import SHOTS_CURVE, method_label  # noqa: E402
from fedmeta.files import atomic_write_bytes, atomic_write_text  # noqa: E402


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _run_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _site_accuracy(row: dict, kind: str) -> float | None:
    values = [v for k, v in row.items() if k.count(".") == 2 and k.endswith(f".{kind}.acc")]
    return sum(values) / len(values) if values else None


def plot_rounds(runs: dict[str, list[dict]], path: Path) -> None:
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        train = [r for r in rows if r["site"] == "*" and r["phase"] == "train"]
        evals = [r for r in rows if r["site"] == "*" and r["phase"] == "evaluate"]
        line = loss_ax.plot([r["round"] for r in train], [r["loss"] for r in train], label=name)[0]
        for kind, style in (("personalized", "-"), ("global", "--")):
            points = [(r["round"], _site_accuracy(r, kind)) for r in evals]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                acc_ax.plot(*zip(*points), style, marker="o", color=line.get_color(), label=f"{name}, {'adapted' if kind == 'personalized' else 'as is'}")
    loss_ax.set(xlabel="round", ylabel="mean local training loss", title="training loss")
    acc_ax.set(xlabel="round (model evaluated)", ylabel="accuracy", title="held-out accuracy of the same sites, every evaluated round")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_gains(results: dict, path: Path) -> bool:
    methods = results["methods"]
    tuned = next((m for m in methods if m.startswith("fedmeta_") and not m.endswith("_global")), None)
    if tuned is None or tuned + "_global" not in methods:
        return False
    bars = []
    for group in ("seen", "unseen"):
        after, before = methods[tuned]["per_site"][group], methods[tuned + "_global"]["per_site"][group]
        bars += [((after[s]["acc"] - before[s]["acc"]) * 100, s, group) for s in after if "acc" in after[s] and "acc" in before.get(s, {})]
    bars.sort()
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(bars)), 4))
    colors = {("seen", True): "tab:green", ("seen", False): "tab:red", ("unseen", True): "tab:cyan", ("unseen", False): "tab:orange"}
    ax.bar(range(len(bars)), [g for g, _, _ in bars], color=[colors[(group, g >= 0)] for g, _, group in bars],
           edgecolor=["black" if group == "unseen" else "none" for _, _, group in bars])
    ax.set_xticks(range(len(bars)), [f"{s}*" if group == "unseen" else s for _, s, group in bars], rotation=90, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="sites, sorted (* = unseen: never took part in training; outlined)", ylabel="accuracy points",
           title=f"{method_label(tuned)}: gain over the unadapted model, per site")
    _save(fig, path)
    return True


def plot_shots(results: dict, path: Path) -> bool:
    curves = {m: r["shots_curve"] for m, r in results["methods"].items() if r.get("shots_curve")}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[str(k)] for k in ks], marker="o", label=method_label(name))
    for name in ("pooled", "fedavg", "local_only"):
        if name in results["methods"] and "acc" in results["methods"][name]["seen"]:
            ax.axhline(results["methods"][name]["seen"]["acc"], linestyle="--", linewidth=1, label=method_label(name), color={"pooled": "gray", "fedavg": "tab:brown", "local_only": "tab:olive"}[name])
    ax.set_xscale("log")
    ax.set_xticks(list(SHOTS_CURVE), [str(k) for k in SHOTS_CURVE])
    ax.set(xlabel="K (shots per class)", ylabel="mean site accuracy", title="accuracy against shots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_communication(runs: dict[str, list[dict]], results: dict, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for name, rows in runs.items():
        key = "fedavg" if name == "fedavg" else f"fedmeta_{name}"
        total = results["methods"].get(key, {}).get("bytes")
        rounds = results.get("rounds")
        if not total or not rounds:
            continue
        points = [(r["round"] * total / rounds / 1e6, _site_accuracy(r, "personalized")) for r in rows if r["site"] == "*" and r["phase"] == "evaluate"]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{name}, adapted")
            drawn = True
    ax.set(xlabel="MB moved (download + upload, all sites)", ylabel="accuracy after adaptation", title="communication against accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return drawn


def write_report(folder: Path, title: str | None = None) -> Path:
    """Plots and ``report.md`` for an evaluation or demo folder (one holding ``results.json``)."""
    from fedmeta.evaluate import results_table_from_json

    folder = Path(folder)
    path = folder / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no results.json: run `fedmeta evaluate` or `fedmeta demo` there first")
    results = json.loads(path.read_text())
    runs = {p.name: _run_rows(p) for p in sorted((folder / "runs").glob("*")) if p.is_dir()}
    images = []
    if runs:
        plot_rounds(runs, folder / "rounds.png")
        images.append(("Loss and accuracy per round", "rounds.png"))
    if plot_gains(results, folder / "gains.png"):
        images.append(("Per-site gain of personalization", "gains.png"))
    if plot_shots(results, folder / "shots.png"):
        images.append(("Accuracy against shots K", "shots.png"))
    if runs and plot_communication(runs, results, folder / "communication.png"):
        images.append(("Communication against accuracy", "communication.png"))
    sites = results["sites"]
    header = title or f"# fedmeta report\n\n{sites['seen']} training sites, {sites['unseen']} unseen; {results['rounds']} rounds; K = {results['shots']} shots per class."
    notes = (
        "Accuracy: mean over a site's classification tasks, then over sites (held-out rows). Worst 10%: mean of the worst tenth of sites. "
        "Gap closed: (method − local only) / (pooled − local only), shown only when pooling beats local-only models."
    )
    body = "\n\n".join(f"## {caption}\n\n![{caption}]({name})" for caption, name in images)
    report = folder / "report.md"
    atomic_write_text(report, f"{header}\n\n{notes}\n\n{results_table_from_json(results)}\n\n{body}\n")
    return report
