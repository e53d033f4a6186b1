"""``fedmeta predict``: offline batch scoring of a CSV or Parquet file with a site's promoted model.

The scoring itself lives in :mod:`fedmeta.predict` (the Python API); this is its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fedmeta.cli.options import SITE_HOME_OPTION
from fedmeta.cli.output import console, console_err


def predict(
    data: Path = typer.Option(..., "--data", help="Rows to score (CSV or Parquet) with the model's feature columns; other columns are ignored."),
    site_home: Path = SITE_HOME_OPTION,
    site: str = typer.Option(None, "--site", help="Whose promoted model to use (default: the only site in the site home)."),
    out: Path = typer.Option(None, "--out", help="Write the predictions here as CSV (default: print the CSV to standard output)."),
) -> None:
    """Score a file of rows with the site's promoted model (hash-verified, onnxruntime), one output row per input row."""
    from fedmeta.data import read_table
    from fedmeta.files import atomic_write_text
    from fedmeta.predict import load_promoted

    model = load_promoted(site_home, site)
    result = model.predict(read_table(data), str(data))
    text = result.to_csv(index=False, float_format="%.6g")
    _warn_outside(result)
    if out is None:
        sys.stdout.write(text)
        return
    atomic_write_text(out, text)
    version = model.version
    console.print(
        f"wrote {len(result)} predictions of {len(model.tasks)} task(s) to {out} with {version.label} (site {version.site}, sha256 {version.sha256[:16]}..., verified)",
        soft_wrap=True,
    )


def _warn_outside(result) -> None:
    """One line on standard error naming the features with values outside the training range, and how often."""
    if "outside_training_range" not in result:
        return
    flagged = result["outside_training_range"]
    rows = int((flagged != "").sum())
    if rows:
        per_feature = flagged[flagged != ""].str.split(";").explode().value_counts()
        listed = ", ".join(f"{name} ({count})" for name, count in per_feature.items())
        console_err.print(f"{rows} of {len(result)} rows have values outside the model's training range, scored all the same: {listed}", soft_wrap=True)
