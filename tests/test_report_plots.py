"""The report's plots draw the results table's figures: read back from the matplotlib figures, on small hand-made results (no training)."""

import matplotlib.pyplot as plt
import pytest

from fedmeta.evaluate import method_label, results_rows
from fedmeta.evaluate.site_scores import aggregate
from fedmeta.report import figure_communication, figure_gains, figure_rounds, figure_shots

SHOTS, ROUNDS = 10, 4
TASKS = ("mortality", "readmission")
# Per site, the global model's accuracy on each classification task at each evaluated round, as the runs log them.
GLOBAL = {
    "fedavg": {2: {"s0": (0.60, 0.70), "s1": (0.80, 0.50), "s2": (0.90, 0.60)}, 4: {"s0": (0.70, 0.75), "s1": (0.85, 0.55), "s2": (0.95, 0.65)}},
    "fomaml": {2: {"s0": (0.62, 0.66), "s1": (0.78, 0.52), "s2": (0.88, 0.61)}, 4: {"s0": (0.72, 0.71), "s1": (0.83, 0.58), "s2": (0.91, 0.66)}},
}
EXAMPLES = {"s0": 10, "s1": 200, "s2": 40}  # uneven, so pooling tasks over sites (the "*" row) gives other numbers than the table's


def _site_accs(run: str, round_: int) -> dict[str, dict[str, float]]:
    return {s: {"acc": sum(a) / len(a)} for s, a in GLOBAL[run][round_].items()}


def _method(seen: dict, unseen: dict | None = None, moved: int | None = None, curve: dict | None = None) -> dict:
    unseen = unseen or {}
    out = {"seen": aggregate(seen), "unseen": aggregate(unseen), "bytes": moved, "per_site": {"seen": seen, "unseen": unseen}}
    if curve:
        out["shots_curve"] = {str(k): v for k, v in curve.items()}
    return out


def _results(fedavg_bytes: int = 8_000_000, fomaml_bytes: int = 8_000_000) -> dict:
    personalized = {"s0": {"acc": 0.81}, "s1": {"acc": 0.64}, "s2": {"acc": 0.88}}
    k_shot = {"s0": {"acc": 0.70}, "s1": {"acc": 0.61}, "s2": {"acc": 0.77}}
    return {
        "shots": SHOTS, "rounds": ROUNDS, "sites": {"seen": 3, "unseen": 1}, "held_out_rows": {"s0": 15, "s1": 240, "s2": 51, "u0": 33},
        "methods": {
            "local_only": _method({"s0": {"acc": 0.79}, "s1": {"acc": 0.66}, "s2": {"acc": 0.86}}),
            "local_only_k": _method(k_shot, curve={1: 0.55, 5: 0.63, SHOTS: aggregate(k_shot)["acc"], 20: 0.74}),
            "pooled": _method({"s0": {"acc": 0.71}, "s1": {"acc": 0.69}, "s2": {"acc": 0.83}}),
            "fedavg": _method(_site_accs("fedavg", ROUNDS), moved=fedavg_bytes),
            "fedavg_ft": _method({"s0": {"acc": 0.80}, "s1": {"acc": 0.65}, "s2": {"acc": 0.87}}, moved=fedavg_bytes),
            # The K-shot curve is plain K-shot adaptation; the table's row is the adaptation chosen per site: different figures.
            "fedmeta_fomaml": _method(personalized, {"u0": {"acc": 0.9}}, fomaml_bytes, curve={1: 0.68, 5: 0.72, SHOTS: 0.745, 20: 0.76}),
            "fedmeta_fomaml_global": _method(_site_accs("fomaml", ROUNDS), {"u0": {"acc": 0.8}}, fomaml_bytes),
        },
    }


def _runs() -> dict[str, list[dict]]:
    runs = {}
    for run, by_round in GLOBAL.items():
        rows = [{"round": r, "phase": "train", "site": "*", "loss": 1.0 / r} for r in range(1, ROUNDS + 1)]
        for r, sites in by_round.items():
            for site, accs in sites.items():
                rows.append({"round": r, "phase": "evaluate", "site": site, "examples": EXAMPLES[site],
                             **{f"{t}.global.acc": a for t, a in zip(TASKS, accs)}, **{f"{t}.personalized.acc": a + 0.1 for t, a in zip(TASKS, accs)}})
            total = sum(EXAMPLES.values())
            rows.append({"round": r, "phase": "evaluate", "site": "*",
                         **{f"{t}.global.acc": sum(sites[s][i] * EXAMPLES[s] for s in sites) / total for i, t in enumerate(TASKS)}})
        runs[run] = rows
    return runs


def _table(results: dict) -> dict[str, str]:
    """The accuracy column of the results table as printed, by method label."""
    return {row[0]: row[1] for row in results_rows(results)}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_rounds_last_accuracy_points_are_the_tables_unadapted_figures():
    results = _results()
    accuracy = figure_rounds(_runs(), results).axes[0]
    drawn = {line.get_label(): line.get_ydata()[-1] for line in accuracy.get_lines()}
    assert set(drawn) == {method_label("fedavg"), method_label("fedmeta_fomaml_global")}
    table = _table(results)
    for label, last in drawn.items():
        assert f"{last:.3f}" == table[label], label
    assert drawn[method_label("fedavg")] == pytest.approx(results["methods"]["fedavg"]["seen"]["acc"], abs=1e-12)
    assert "no adaptation" in accuracy.get_ylabel()


def test_rounds_puts_each_runs_loss_on_its_own_axis_named_for_what_it_is():
    losses = figure_rounds(_runs(), _results()).axes[1:]
    named = {ax.get_ylabel(): [line.get_label() for line in ax.get_lines()] for ax in losses if ax.get_visible()}
    assert named == {"FedAvg: mean local training loss": ["fedavg"], "fomaml: mean query loss after adaptation": ["fomaml"]}


def test_shots_draws_every_table_method_at_its_figure_and_k_shot_curves_as_k_shot():
    results = _results()
    lines = figure_shots(results).axes[0].get_lines()
    for label, cell in _table(results).items():
        drawn = [line for line in lines if line.get_label().startswith(label)]
        assert drawn, f"{label} is not drawn"
        line = drawn[0]
        xs, ys = list(line.get_xdata()), list(line.get_ydata())
        # A K-shot curve holds the table's figure at the table's K; any other method is a line at its figure.
        at = ys[xs.index(SHOTS)] if SHOTS in xs else ys[0]
        assert f"{at:.3f}" == cell and cell in line.get_label(), (label, at, cell)
    curve = next(line for line in lines if line.get_label() == "FedMeta fomaml, K-shot adaptation")
    assert list(curve.get_ydata()) == [0.68, 0.72, 0.745, 0.76]
    assert not [line for line in lines if "chosen" in line.get_label() and len(set(line.get_ydata())) > 1], "a K-shot curve labelled as the chosen adaptation"


def test_communication_is_left_out_when_the_runs_move_the_same_bytes():
    assert figure_communication(_runs(), _results()) is None


def test_communication_ends_at_the_tables_bytes_and_accuracy_when_the_runs_differ():
    results = _results(fedavg_bytes=8_000_000, fomaml_bytes=3_000_000)
    lines = figure_communication(_runs(), results).axes[0].get_lines()
    table = {row[0]: row for row in results_rows(results)}
    assert len(lines) == 2
    for line in lines:
        row = table[line.get_label()]
        assert (f"{line.get_xdata()[-1]:.1f}", f"{line.get_ydata()[-1]:.3f}") == (row[-1], row[1])


def test_gains_name_each_sites_held_out_rows_under_its_bar():
    results = _results()
    ax = figure_gains(results).axes[0]
    heights = {tick.get_text(): bar.get_height() for tick, bar in zip(ax.get_xticklabels(), ax.patches)}
    per_site = results["methods"]
    expected = {}
    for group, mark in (("seen", ""), ("unseen", "*")):
        for site, after in per_site["fedmeta_fomaml"]["per_site"][group].items():
            before = per_site["fedmeta_fomaml_global"]["per_site"][group][site]
            expected[f"{site}{mark} (n={results['held_out_rows'][site]})"] = (after["acc"] - before["acc"]) * 100
    assert heights == pytest.approx(expected)


def test_the_report_leaves_out_an_earlier_communication_plot_that_no_longer_applies(tmp_path):
    import json

    from fedmeta.report import write_report

    (tmp_path / "results.json").write_text(json.dumps(_results()))
    for run, rows in _runs().items():
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "communication.png").write_bytes(b"an earlier report's plot")
    report = write_report(tmp_path).read_text()
    assert not (tmp_path / "communication.png").exists() and "communication.png" not in report
    assert all(f"]({plot})" in report and (tmp_path / plot).exists() for plot in ("rounds.png", "gains.png", "shots.png"))
