"""``fedmeta contributions RUN_DIR``: what each site gave the run, from its ``contributions.json`` (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail
from fedmeta.cli.output import console, print_json, print_rows
from fedmeta.fl.contribution_report import COLUMNS, REPORT, load_report, rows, to_check

HOW = "turn it on with [contributions] enabled = true in the run's configuration"


def print_report(report: dict, title: str) -> None:
    """The table, what its numbers are, and the sites to check."""
    print_rows(title, COLUMNS, rows(report))
    console.print(f"method: {report['method']}; unit: {report.get('unit', 'validation loss decrease')}", highlight=False, soft_wrap=True)
    check = to_check(report)
    if check:
        console.print(f"[yellow]sites to check[/] (their updates raised the other sites' validation loss, the whole interval below zero): {', '.join(check)}", highlight=False, soft_wrap=True)


def contributions(
    run_dir: Path = typer.Argument(..., help="A run folder (fedmeta train's or flwr run's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """What each site contributed to a run: its summed per-round Shapley value, with a 95% interval."""
    if not run_dir.is_dir():
        raise fail(f"{run_dir}: no such run folder")
    try:
        report = load_report(run_dir)
    except ValueError as e:
        raise fail(e) from None
    if report is None:
        raise fail(f"{run_dir}: no {REPORT} (the run had contributions off; {HOW})")
    if as_json:
        print_json(report)
        return
    print_report(report, f"contributions to {run_dir}")
