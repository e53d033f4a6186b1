"""``fedmeta contributions RUN_DIR``: the table, the JSON, the sites to check, and one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.fl.contributions import FIRST_ORDER, Ledger

runner = CliRunner()


def a_report(run_dir) -> dict:
    ledger = Ledger(FIRST_ORDER)
    ledger.add(1, {"clinic-a": (0.30, 0.05), "clinic-b": (0.10, 0.2), "clinic-c": (-0.20, 0.02)}, {"clinic-a": 1.5}, {"clinic-a": {"t": 120}, "clinic-c": {"t": 40}})
    ledger.add(2, {"clinic-a": (0.20, 0.05), "clinic-c": (-0.10, 0.02)}, {"clinic-a": 1.0}, {})
    return ledger.save(run_dir, {"clinic-b": 1})


def test_the_table_lists_sites_by_contribution_and_names_the_site_to_check(tmp_path):
    a_report(tmp_path)
    result = runner.invoke(app, ["contributions", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output  # a table, or one block per site on a narrow terminal: either reads site by site
    order = [out.index(site) for site in ("clinic-a", "clinic-b", "clinic-c")]
    assert order == sorted(order), "highest contribution first"
    row_a = out[order[0]:order[1]]
    assert "+0.5000" in row_a and "120" in row_a and "2.5" in row_a, "summed over rounds: 0.3 + 0.2, its rows, its seconds"
    assert "sites to check" in result.output and "clinic-c" in result.output.split("sites to check")[1]
    assert "clinic-b" not in result.output.split("sites to check")[1], "an interval that straddles zero is not confidently negative"


def test_json_gives_the_report_with_each_sites_interval(tmp_path):
    a_report(tmp_path)
    result = runner.invoke(app, ["contributions", str(tmp_path), "--json"])
    report = json.loads(result.output)
    c = report["sites"]["clinic-c"]
    assert c["contribution"] == -0.3 and c["ci"][1] < 0 and c["rounds"] == 2
    assert report["sites"]["clinic-b"]["failures"] == 1 and report["method"] == FIRST_ORDER


def test_a_run_without_contributions_and_a_damaged_report_each_fail_in_one_line(tmp_path):
    result = runner.invoke(app, ["contributions", str(tmp_path)])
    assert result.exit_code == 2 and "no contributions.json" in result.output and "contributions] enabled = true" in result.output
    (tmp_path / "contributions.json").write_text("[1, 2")
    result = runner.invoke(app, ["contributions", str(tmp_path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "contributions.json: not a contributions report" in result.output
