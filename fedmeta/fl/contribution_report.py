"""Reading a run's ``contributions.json`` (written by :mod:`fedmeta.fl.contributions`) without torch: the table and the sites to check."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

REPORT = "contributions.json"


def load_report(run_dir: str | Path) -> dict | None:
    """``run_dir``'s contributions report; None when the run had contributions off. A damaged file: one line naming it."""
    path = Path(run_dir) / REPORT
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
        report["method"], report["sites"]  # noqa: B018 (the two keys every report has)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a contributions report ({type(e).__name__}: {e})") from None
    return report


def to_check(report: Mapping) -> list[str]:
    """Sites whose contribution is confidently negative: their whole interval is below zero (an unknown interval never is)."""
    return [site for site, s in report.get("sites", {}).items() if s.get("ci") is not None and s["ci"][1] < 0]


def rows(report: Mapping) -> list[list[str]]:
    """One row per site, highest contribution first: site, contribution, 95% interval, share of the positive total, rounds, rows (its largest task's labelled rows), seconds, failures."""
    sites = report["sites"]
    positive = sum(max(s["contribution"], 0.0) for s in sites.values()) or 1.0
    out = []
    for name, s in sorted(sites.items(), key=lambda item: -item[1]["contribution"]):
        share = f"{100 * s['contribution'] / positive:.0f}%" if s["contribution"] > 0 else "-"
        if s.get("ci") is None:
            interval = "unknown"  # a round scored by one site only, or self-reported (fedmeta.fl.contributions)
        else:
            lo, hi = s["ci"]
            interval = f"[{lo:+.4f}, {hi:+.4f}]" + (" check" if hi < 0 else "")
        out.append([name, f"{s['contribution']:+.4f}", interval, share, str(s["rounds"]),
                    str(max(s["rows"].values(), default=0)), f"{s['seconds']:.1f}", str(s["failures"])])
    return out


COLUMNS = ["site", "contribution", "95% interval", "share", "rounds", "rows", "seconds", "failures"]
