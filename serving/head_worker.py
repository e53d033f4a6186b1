"""One head job, run in a process of its own: train, check, export, register.

A separate process keeps torch's training off the server's interpreter (no
GIL contention with the event loop) and makes a job cancellable at any
point: the server terminates the process. Nothing is half-written then:
the version folder is complete before the registry knows it, and the
registry write is one SQLite transaction.

Before anything is registered the new model is run on every labelled row
of the request; a model whose outputs are not all finite is refused.

Rows the request sent in the site's dialect arrive already read through the
parent's mapping (the plan's ``rows``, :func:`serving.heads.check_head_request`);
the version registered records that mapping, as ``fedmeta heads add`` does.
"""

from __future__ import annotations

import os

FAILED_NOT_FINITE = "the trained head's outputs are not finite on its validation rows; nothing was registered"


def run(conn, job: dict) -> None:
    """Entry point of the job process: sends one result dict through ``conn``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        conn.send(_run(job))
    except Exception as e:  # reported to the parent; only the type, the message may quote rows
        conn.send({"status": "failed", "error": f"internal error in the head job ({type(e).__name__}); the server log has the details",
                   "log": {"error_type": type(e).__name__}})
    finally:
        conn.close()


def _run(job: dict) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from fedmeta.data import SchemaError, TaskColumn
    from fedmeta.data.mapping import Mapping
    from fedmeta.export import ExportError
    from fedmeta.manifest import ManifestError
    from fedmeta.personalize import PersonalizationError, base_of, data_lineage, load_trained, publish, train_head
    from fedmeta.registry import SiteHome
    from fedmeta.trained import ModelMismatchError

    torch.set_num_threads(1)
    home = SiteHome(job["site_home"])
    request = job["request"]
    try:
        parent = home.registry.get(job["parent"])
        start = load_trained(home, parent)
        recorded = home.load(parent)[0].mapping
        mapping = None if recorded is None else Mapping.model_validate(recorded)
        frame = pd.DataFrame(job["plan"].get("rows", request["rows"]))
        source = f"head request {job['id']} rows"
        column = TaskColumn.model_validate(job["plan"]["task"])
        result = train_head(start, column, frame, source, steps=request["steps"], tune_body=request["tune_body"], seed=request["seed"], site=job["site"])
        if not _outputs_finite(result.model, column, frame):
            return {"status": "failed", "error": FAILED_NOT_FINITE}
        published = publish(
            home, result.model, "head", job["site"], parent=parent, base=base_of(home, parent), metrics=result.metrics,
            data=data_lineage(None, source="api", job=job["id"], rows=result.rows, held_out=result.holdout_rows),
            training={"task": column.name, "kind": column.kind, "steps": request["steps"], "tune_body": request["tune_body"], "seed": request["seed"], "note": result.note},
            personalized_tasks=job["personalized"] + [column.name], promote=job["promote"], actor=job["actor"],
            feature_ranges=result.feature_ranges, mapping=mapping,
        )
    except (SchemaError, PersonalizationError, ModelMismatchError, ExportError, ManifestError, ValueError) as e:
        return {"status": "failed", "error": str(e)[:500]}
    metrics = {k: float(v) for k, v in result.metrics.items() if np.isfinite(v)}
    return {"status": "succeeded", "version": published.version.label, "promoted": published.promoted, "metrics": metrics, "note": result.note}


def _outputs_finite(trained, column, frame) -> bool:
    """The new model's outputs for ``column`` on the labelled rows, in the units the server returns, are all finite."""
    import numpy as np
    import torch

    labelled = frame[frame[column.label].notna()]
    schema = trained.schema
    x = torch.from_numpy(schema.encode(labelled))
    with torch.no_grad():
        out = trained.module()(x, column.name).numpy().astype(np.float32)
    if column.kind == "regression":
        out = out * np.float32(column.target_std) + np.float32(column.target_mean)
    params_finite = all(bool(torch.isfinite(p).all()) for p in trained.params.values())
    return params_finite and bool(np.isfinite(out).all())
