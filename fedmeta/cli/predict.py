"""``fedmeta predict``: offline batch scoring of a CSV or Parquet file with a site's promoted model.

The model is the ONNX file the server would load, read through the registry
(so its bytes are checked against the hash recorded at registration) and run
with onnxruntime; rows are checked against the model's schema first, with
errors that name the file, column and row, never the value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fedmeta.cli.options import SITE_HOME_OPTION, open_home
from fedmeta.cli.output import console


def predict(
    data: Path = typer.Option(..., "--data", help="Rows to score (CSV or Parquet) with the model's feature columns; other columns are ignored."),
    site_home: Path = SITE_HOME_OPTION,
    site: str = typer.Option(None, "--site", help="Whose promoted model to use (default: the only site in the site home)."),
    out: Path = typer.Option(None, "--out", help="Write the predictions here as CSV (default: print the CSV to standard output)."),
) -> None:
    """Score a file of rows with the site's promoted model (hash-verified, onnxruntime), one output row per input row."""
    import numpy as np
    import onnxruntime as ort
    import pandas as pd

    from fedmeta.data import Schema, SchemaError, read_table
    from fedmeta.files import atomic_write_text

    home = open_home(site_home)
    version = home.current(site)
    manifest, onnx_bytes = home.load(version)  # bytes checked against the registry's record
    if manifest.schema_ is None:
        raise SchemaError(f"{version.label} has no schema in its manifest: it cannot score rows")
    schema = Schema.model_validate(manifest.schema_)
    frame = read_table(data)
    if frame.empty:
        raise SchemaError(f"{data}: the file has no rows")
    schema.validate_frame(frame, str(data))

    feed = {}
    for feature in schema.features:
        column = frame[feature.name]
        if feature.type == "numeric":
            feed[feature.name] = pd.to_numeric(column).to_numpy(np.float32)
        else:
            feed[feature.name] = column.astype(str).to_numpy(object)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    tasks = [t for t in manifest.tasks]
    outputs = session.run([t.name for t in tasks], feed)

    result = pd.DataFrame(index=range(len(frame)))
    for task, values in zip(tasks, outputs):
        if task.kind == "regression":
            result[task.name] = np.asarray(values).reshape(len(frame))
            continue
        classes = task.classes or [str(i) for i in range(values.shape[1])]
        result[task.name] = [classes[i] for i in values.argmax(1)]
        for j, name in enumerate(classes):
            result[f"{task.name}.p_{name}"] = values[:, j]
    text = result.to_csv(index=False, float_format="%.6g")
    if out is None:
        sys.stdout.write(text)
        return
    atomic_write_text(out, text)
    console.print(
        f"wrote {len(result)} predictions of {len(tasks)} task(s) to {out} with {version.label} (site {version.site}, sha256 {version.sha256[:16]}..., verified)",
        soft_wrap=True,
    )
