"""Tables of results: method order and labels, the gap closed, rows as printed, ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedmeta.evaluate.harness import MethodResult

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
    fixed = ["local_cv", "local_linear", "local_gbm", "local_only", "local_best", "local_only_k", "pooled", "pooled_oracle", "fedavg", "fedavg_ft", "ditto", "fedrep", "fedper", "fedbabu", "apfl", "perfedavg"]
    return (fixed.index(name), "") if name in fixed else (len(fixed), name.removesuffix("_global") + ("~" if name.endswith("_global") else ""))


def method_label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    algorithm = name.removeprefix("fedmeta_")
    if algorithm.endswith("_global"):
        return f"FedMeta {algorithm.removesuffix('_global')}, no adaptation"
    return f"FedMeta {algorithm} + chosen adaptation"


LABELS = {
    "local_cv": "local, own CV pick (the bar)",
    "local_linear": "local logistic/ridge (CV)",
    "local_gbm": "local gradient boosting",
    "local_only": "local only (all own rows)",
    "local_best": "local, best of 3 on test (ref.)",
    "local_only_k": "local only (K shots, scikit-learn)",
    "pooled": "pooled oracle (centralized)",
    "fedavg": "FedAvg",
    "fedavg_ft": "FedAvg + fine-tuning on all rows",
    "pooled_oracle": "pooled oracle + site indicator",
    "ditto": "Ditto",
    "fedrep": "FedRep",
    "fedper": "FedPer",
    "fedbabu": "FedBABU",
    "apfl": "APFL",
    "perfedavg": "Per-FedAvg (FO)",
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
