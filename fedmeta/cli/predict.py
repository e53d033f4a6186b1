"""``fedmeta predict``: offline batch scoring of a CSV or Parquet file with a site's promoted model.

The scoring itself lives in :mod:`fedmeta.predict` (the Python API); this is its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fedmeta.cli.options import SITE_HOME_OPTION
from fedmeta.cli.output import console


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
    if out is None:
        sys.stdout.write(text)
        return
    atomic_write_text(out, text)
    version = model.version
    console.print(
        f"wrote {len(result)} predictions of {len(model.tasks)} task(s) to {out} with {version.label} (site {version.site}, sha256 {version.sha256[:16]}..., verified)",
        soft_wrap=True,
    )
