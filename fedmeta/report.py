"""Reports people can look at: ``report.md`` with PNG plots, from an evaluation or demo folder.

Reads ``results.json`` and the training runs under ``runs/`` and draws
(matplotlib, headless); every figure a plot shares with the results table is
the table's figure (``tests/test_report_plots.py`` reads them back):

- ``rounds.png``: per run, its own training loss (FedAvg's local training loss and a
  meta-learner's query loss after adaptation are different quantities, so each has its axis);
  and the held-out accuracy of every run's global model, unadapted, per evaluated round, whose
  last point is the table's "FedAvg" or "FedMeta …, no adaptation" figure;
- ``gains.png``: each site's accuracy gain of the personalized model over the global one, sorted
  and named with the site's held-out row count, unseen sites marked;
- ``shots.png``: mean site accuracy against the number of shots K where a method has a K-shot
  figure, and every other method of the table as a horizontal line at its table figure;
- ``communication.png``: accuracy against cumulative megabytes moved, only when the runs
  move different amounts (otherwise it would repeat ``rounds.png``).

``fedmeta report FOLDER`` regenerates it all.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on a site's server
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedmeta.evaluate import SHOTS_CURVE, method_label, method_order  # noqa: E402
from fedmeta.files import atomic_write_bytes, atomic_write_text  # noqa: E402


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _run_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_method(run: str) -> str:
    """The results-table method whose figure a training run's global model, unadapted, is."""
    return "fedavg" if run == "fedavg" else f"fedmeta_{run}_global"


def global_accuracy(rows: list[dict]) -> list[tuple[int, float]]:
    """Per evaluated round, the global model's held-out accuracy as the table computes it.

    The mean over a site's classification tasks, then over sites, from the
    per-site rows: the ``*`` row pools tasks over sites instead, a different
    number from the table's.
    """
    by_round: dict[int, list[float]] = {}
    for row in rows:
        if row["phase"] != "evaluate" or row["site"] == "*":
            continue
        accs = [v for k, v in row.items() if k.count(".") == 2 and k.endswith(".global.acc")]
        if accs:
            by_round.setdefault(row["round"], []).append(sum(accs) / len(accs))
    return [(r, sum(v) / len(v)) for r, v in sorted(by_round.items())]


def _loss_label(run: str) -> str:
    if run == "fedavg":
        return "FedAvg: mean local training loss"
    if run == "reptile":
        return "reptile: mean inner-loop training loss"
    return f"{run}: mean query loss after adaptation"


def figure_rounds(runs: dict[str, list[dict]], results: dict) -> Figure:
    """One axis per run's training loss, and one for every run's unadapted global accuracy (last point: the table's)."""
    n = len(runs) + 1
    cols = min(3, n)
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.6 * rows_), squeeze=False)
    flat = list(axes.flat)
    acc_ax = flat[0]
    for ax, (name, rows) in zip(flat[1:], runs.items()):
        train = [r for r in rows if r["site"] == "*" and r["phase"] == "train" and "loss" in r]
        ax.plot([r["round"] for r in train], [r["loss"] for r in train], marker=".", label=name)
        ax.set(xlabel="round", ylabel=_loss_label(name), title=f"{name}: training loss")
    for name, rows in runs.items():
        points = global_accuracy(rows)
        if not points:
            continue
        xs, ys = zip(*points)
        acc_ax.plot(xs, ys, marker="o", label=f"{method_label(run_method(name))}")
        acc_ax.annotate(f"{ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0), fontsize=7)
    acc_ax.set(xlabel="round (model evaluated)", ylabel="held-out accuracy, global model, no adaptation",
               title="accuracy of the global model per round\n(last point: the table's figure)")
    for ax in flat[: n]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def held_out_gains(results: dict) -> tuple[str, list[tuple[float, str, str]]] | None:
    """The personalized method and, per site, its accuracy gain over the same model unadapted (points), sorted."""
    methods = results["methods"]
    tuned = next((m for m in sorted(methods, key=method_order) if m.startswith("fedmeta_") and not m.endswith("_global")), None)
    if tuned is None or tuned + "_global" not in methods:
        return None
    bars = []
    for group in ("seen", "unseen"):
        after, before = methods[tuned]["per_site"][group], methods[tuned + "_global"]["per_site"][group]
        bars += [((after[s]["acc"] - before[s]["acc"]) * 100, s, group) for s in after if "acc" in after[s] and "acc" in before.get(s, {})]
    return tuned, sorted(bars)


def figure_gains(results: dict) -> Figure | None:
    found = held_out_gains(results)
    if found is None:
        return None
    tuned, bars = found
    rows = results.get("held_out_rows", {})
    fig, ax = plt.subplots(figsize=(max(8, 0.26 * len(bars)), 4.4))
    colors = {("seen", True): "tab:green", ("seen", False): "tab:red", ("unseen", True): "tab:cyan", ("unseen", False): "tab:orange"}
    ax.bar(range(len(bars)), [g for g, _, _ in bars], color=[colors[(group, g >= 0)] for g, _, group in bars],
           edgecolor=["black" if group == "unseen" else "none" for _, _, group in bars])
    # A gain measured on a handful of rows is a row or two changing sides: the count says how much a bar weighs.
    ticks = [f"{s}{'*' if group == 'unseen' else ''}" + (f" (n={rows[s]})" if s in rows else "") for _, s, group in bars]
    ax.set_xticks(range(len(bars)), ticks, rotation=90, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    counted = "; n = held-out rows" if rows else ""
    ax.set(xlabel=f"sites, sorted (* = unseen: never took part in training; outlined{counted})", ylabel="accuracy points",
           title=f"{method_label(tuned)}: gain over the unadapted model, per site")
    return fig


def shots_label(name: str) -> str:
    """What a method's K-shot curve is: a FedMeta curve is plain K-shot adaptation, not the table's chosen adaptation."""
    if name.startswith("fedmeta_"):
        return f"FedMeta {name.removeprefix('fedmeta_')}, K-shot adaptation"
    return method_label(name)


def figure_shots(results: dict) -> Figure | None:
    """K-shot curves as measured, and every method of the table at its table figure (a line where it has no K)."""
    methods = results["methods"]
    curves = {m: r["shots_curve"] for m, r in methods.items() if r.get("shots_curve")}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name in sorted(curves, key=method_order):
        curve = curves[name]
        ks = sorted(int(k) for k in curve)
        label = shots_label(name)
        if not name.startswith("fedmeta_") and "acc" in methods[name]["seen"]:
            label += f" (table, K = {results.get('shots')}: {methods[name]['seen']['acc']:.3f})"
        ax.plot(ks, [curve[str(k)] for k in ks], marker="o", linewidth=2, label=label)
    # The table's figures for the rest, drawn flat at that value: one value each (all rows, a choice, no adaptation).
    # A FedMeta curve is K-shot adaptation alone, the table's row is the adaptation chosen per site: both are drawn.
    flat = [m for m in sorted(methods, key=method_order) if "acc" in methods[m]["seen"] and (m not in curves or m.startswith("fedmeta_"))]
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(flat):
        value = methods[name]["seen"]["acc"]
        ax.axhline(value, linestyle=("--", ":", "-.")[i % 3], linewidth=1, color=cmap(i % 20), label=f"{method_label(name)}: {value:.3f}")
    ax.set_xscale("log")
    ax.set_xticks(list(SHOTS_CURVE), [str(k) for k in SHOTS_CURVE])
    ax.set(xlabel="K (shots per class)", ylabel="mean site accuracy (training sites' held-out rows)", title="accuracy against shots; lines: the table's figures")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def run_bytes(runs: dict[str, list[dict]], results: dict) -> dict[str, int]:
    """Each run's megabytes moved as the table records them (its method's ``bytes``)."""
    out = {}
    for name in runs:
        total = results["methods"].get(run_method(name), {}).get("bytes")
        if total:
            out[name] = total
    return out


def figure_communication(runs: dict[str, list[dict]], results: dict) -> Figure | None:
    """Accuracy against cumulative megabytes; None when every run moves the same bytes (it would repeat rounds.png)."""
    moved = run_bytes(runs, results)
    rounds = results.get("rounds")
    if len(set(moved.values())) < 2 or not rounds:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, total in moved.items():
        points = global_accuracy(runs[name])
        if points:
            ax.plot([r * total / rounds / 1e6 for r, _ in points], [a for _, a in points], marker="o", label=method_label(run_method(name)))
    ax.set(xlabel="MB moved so far (download + upload, all sites)", ylabel="held-out accuracy, global model, no adaptation",
           title="communication against accuracy (last point: the table's figures)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_report(folder: Path, title: str | None = None) -> Path:
    """Plots and ``report.md`` for an evaluation or demo folder (one holding ``results.json``)."""
    from fedmeta.evaluate import results_table_from_json

    folder = Path(folder)
    path = folder / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no results.json: run `fedmeta evaluate` or `fedmeta demo` there first")
    results = json.loads(path.read_text())
    runs = {p.name: _run_rows(p) for p in sorted((folder / "runs").glob("*")) if p.is_dir()}
    figures = [
        ("Training loss and the global model's accuracy per round", "rounds.png", figure_rounds(runs, results) if runs else None),
        ("Per-site gain of personalization", "gains.png", figure_gains(results)),
        ("Accuracy against shots K", "shots.png", figure_shots(results)),
        ("Communication against accuracy", "communication.png", figure_communication(runs, results) if runs else None),
    ]
    images = []
    for caption, name, fig in figures:
        if fig is None:
            (folder / name).unlink(missing_ok=True)  # an earlier report's plot that no longer applies would be read as current
            continue
        _save(fig, folder / name)
        images.append((caption, name))
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
