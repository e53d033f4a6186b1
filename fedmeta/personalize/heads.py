"""Task heads for a department's question: fitted on a few labelled rows on the meta-learned body (ANIL-style).

The task may be one the federation knows (training starts from its head) or
brand new; the body stays frozen or is lightly tuned. The rows scored are
held out by the one split rule (:func:`~fedmeta.data.site.held_out_mask`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedmeta.data.schema import Schema, SchemaError, TaskColumn
from fedmeta.data.site import held_out_mask
from fedmeta.meta.inner import make_loss, per_row_loss
from fedmeta.models import TaskSpec, head_prefix
from fedmeta.personalize.base import PersonalizationError
from fedmeta.scoring import baseline_scores, task_scores
from fedmeta.trained import TrainedModel

MIN_HOLDOUT_ROWS = 20
MIN_CLASS_ROWS = 4
#: Share of a head request's rows held out for its score.
HEAD_TEST_FRACTION = 0.25


@dataclass
class HeadResult:
    """A model with a (new or retrained) head, its held-out scores, and a note on how they were measured."""

    model: TrainedModel
    task: TaskColumn
    metrics: dict[str, float]
    rows: int
    holdout_rows: int
    note: str
    seconds: float
    feature_ranges: dict[str, list[float]] | None = None


def head_task(schema: Schema, name: str, kind: str | None, label: str | None, classes: list[str] | None, frame: pd.DataFrame, source: str) -> TaskColumn:
    """The task column for a head request: the federation's own if it knows the task, else a new one from the rows."""
    known = {t.name: t for t in schema.tasks}
    if name in known:
        task = known[name]
        if kind is not None and kind != task.kind:
            raise PersonalizationError(f"task {name!r} is {task.kind} in the federation schema, not {kind}")
        if label is not None and label != task.label:
            task = task.model_copy(update={"label": label})
        return task
    if kind is None:
        raise PersonalizationError(f"task {name!r} is new to the federation: give its kind (binary, multiclass or regression)")
    label = label or name
    if label in [f.name for f in schema.features]:
        raise PersonalizationError(f"label column {label!r} of task {name!r} is a feature of the schema")
    if label not in frame.columns:
        raise SchemaError(f"{source}: missing label column {label!r} for task {name!r}")
    values = frame[label].dropna()
    if values.empty:
        raise SchemaError(f"{source}: label column {label!r} has no values")
    try:
        if kind == "regression":
            numbers = pd.to_numeric(values)
            std = float(numbers.std()) if len(numbers) > 1 else 1.0
            return TaskColumn(name=name, kind=kind, label=label, target_mean=float(numbers.mean()), target_std=std if std > 1e-12 else 1.0)
        found = sorted(values.astype(str).str.removesuffix(".0").unique())
        classes = classes or found
        return TaskColumn(name=name, kind=kind, label=label, classes=classes, n_classes=len(classes))
    except (ValueError, TypeError) as e:
        raise PersonalizationError(f"{source}: task {name!r} ({kind}) cannot use label column {label!r}: {e}") from None


def _held_out(labelled: np.ndarray, y: np.ndarray, classification: bool, site: str, seed: int) -> np.ndarray | None:
    """Which labelled rows are held out, by :func:`held_out_mask` over all the request's rows; None when no meaningful score exists.

    ``labelled`` marks the request's rows that carry a label. Rows are held
    out only with at least :data:`MIN_HOLDOUT_ROWS` labelled rows (and
    :data:`MIN_CLASS_ROWS` per class), and only if the rows left to train on
    still show every class.
    """
    if len(y) < MIN_HOLDOUT_ROWS or classification and np.unique(y, return_counts=True)[1].min() < MIN_CLASS_ROWS:
        return None
    held = held_out_mask(site, len(labelled), HEAD_TEST_FRACTION, seed)[labelled]
    if not held.any() or held.all() or classification and len(np.unique(y[~held])) < len(np.unique(y)):
        return None
    return held


def train_head(
    start: TrainedModel,
    task: TaskColumn,
    frame: pd.DataFrame,
    source: str,
    steps: int = 300,
    lr: float = 0.05,
    tune_body: bool = False,
    seed: int = 0,
    *,
    site: str,
) -> HeadResult:
    """Fit ``task``'s head on the labelled rows of ``frame`` (rows of ``site``) on top of ``start``'s body.

    The body stays frozen (ANIL-style), or with ``tune_body`` moves at a
    tenth of the head's rate. A task the model already has starts from its
    current head; a new task from a zero head. With at least 20 labelled rows
    (and 4 per class) the rows the one split rule holds out of ``frame``
    (:func:`held_out_mask` of ``site``, a quarter, ``seed``) are scored and
    never trained on, and the old head, if any, is scored on the same rows;
    otherwise the note says that no held-out score exists.
    """
    began = time.perf_counter()
    schema = start.schema
    tasks = [t if t.name != task.name else task for t in schema.tasks]
    if task.name not in start.tasks:
        tasks.append(task)
    schema = schema.model_copy(update={"tasks": tasks})
    schema.validate_frame(frame, source)
    if task.label not in frame.columns:
        raise SchemaError(f"{source}: missing label column {task.label!r} for task {task.name!r}")
    has_label = frame[task.label].notna().to_numpy()
    labelled = frame[has_label]
    if labelled.empty:
        raise SchemaError(f"{source}: label column {task.label!r} has no values")
    x = schema.encode(labelled)
    y = schema.labels(labelled, task.name)
    if task.is_classification:
        y = y.astype(np.int64)
        present = np.unique(y)
        if len(present) < 2:
            raise PersonalizationError(f"{source}: task {task.name!r} needs rows of at least two classes; all labelled rows are {task.classes[present[0]]!r}")
    held = _held_out(has_label, y, task.is_classification, site, seed)
    if held is None:
        held = np.zeros(len(y), bool)
    train_idx, test_idx = np.flatnonzero(~held), np.flatnonzero(held)

    spec = TaskSpec(name=task.name, kind=task.kind, n_classes=task.n_classes)
    model = start.module()
    had_head = task.name in model.heads and model.tasks[task.name] == spec
    if not had_head:
        if task.name in model.heads:
            del model.heads[task.name]
            del model.tasks[task.name]
        model.add_head(spec)
        torch.nn.init.zeros_(model.heads[task.name].weight)
        torch.nn.init.zeros_(model.heads[task.name].bias)
    old_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(seed)
    head = list(model.heads[task.name].parameters())
    groups = [{"params": head, "lr": lr}]
    if tune_body:
        groups.append({"params": list(model.body.parameters()), "lr": lr / 10})
    else:
        model.body.requires_grad_(False)
    optimizer = torch.optim.Adam(groups, weight_decay=1e-4)
    loss_fn = make_loss(model, task.name)
    xt, yt = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])
    wt = torch.ones(len(train_idx))
    params = dict(model.named_parameters())
    with torch.no_grad():
        features = model.body(xt) if not tune_body else None
    for _ in range(steps):
        optimizer.zero_grad()
        if features is not None:
            out = model.heads[task.name](features)
            loss = per_row_loss(spec, out, yt).mean()
        else:
            loss = loss_fn(params, xt, yt, wt)
        loss.backward()
        optimizer.step()
    model.requires_grad_(True)

    new_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    metrics: dict[str, float] = {}
    if len(test_idx):
        xs, ys = x[test_idx], y[test_idx]
        for name, value in task_scores(model, new_params, task.name, xs, ys).items():
            metrics[f"{task.name}.head.{name}"] = value
        if had_head:
            for name, value in task_scores(model, old_params, task.name, xs, ys).items():
                metrics[f"{task.name}.previous.{name}"] = value
        for name, value in baseline_scores(y[train_idx], ys, task.is_classification).items():
            metrics[f"{task.name}.baseline.{name}"] = value
        note = f"scored on {len(test_idx)} held-out rows of {len(y)} (the site's split rule: a quarter of its rows)"
    else:
        note = (
            f"only {len(y)} labelled rows: no held-out score (needs >= {MIN_HOLDOUT_ROWS} rows"
            + (f" and >= {MIN_CLASS_ROWS} per class, every class left to train on)" if task.is_classification else ")")
            + "; the head was trained on all of them"
        )
    state = {"params": new_params}
    if "inner_lrs" in start.state:
        state["inner_lrs"] = {k: v for k, v in start.state["inner_lrs"].items() if not k.startswith(head_prefix(task.name))}
    trained = TrainedModel(schema, start.hidden, state, dict(start.info))
    return HeadResult(trained, task, metrics, len(y), len(test_idx), note, time.perf_counter() - began, schema.raw_ranges(x[train_idx]))
