"""Site personalization: K-shot fine-tuning of the global base model, new task heads, and publishing.

- :func:`load_base` reads a global base model from a training run folder
  (``base_model.pt``) or from the registry; :func:`register_base` records it.
- :func:`personalize` fine-tunes the base on K shots per task drawn from the
  site's training rows and scores base and personalized models on the
  site's held-out rows. It adapts with the engine's inner step
  (:func:`fedmeta.meta.inner.sgd_update`), as the base was meta-trained to
  be adapted: all layers, the heads only, or with Meta-SGD's learned rates.
  All of the site's tasks adapt together, since they share the body: each
  head follows its own task's gradient, the body the mean of the tasks'.
- :func:`train_head` fits a head for a department's task (known to the
  federation or brand new) on a few labelled rows, ANIL-style: on the frozen
  meta-learned body, or with the body lightly tuned.
- :func:`publish` exports a model to ONNX, writes its manifest and registers
  it as a new version of the site.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from fedmeta.data.schema import Schema, SchemaError, TaskColumn
from fedmeta.data.site import SiteData
from fedmeta.export import export_onnx
from fedmeta.fl.aggregation import unflatten_state
from fedmeta.fl.config import RunConfig
from fedmeta.manifest import Manifest, TaskOutput, sha256_bytes, sha256_file
from fedmeta.meta.inner import make_loss, per_row_loss, sgd_update
from fedmeta.models import TaskSpec, head_prefix, is_body_param
from fedmeta.registry import ModelVersion, RegistryError, SiteHome, current_user, parse_version
from fedmeta.scoring import baseline_scores, task_scores
from fedmeta.trained import ModelMismatchError, TrainedModel

Mode = Literal["all", "head", "metasgd"]
MODES = ("all", "head", "metasgd")
BASE_FILE = "base_model.pt"


class PersonalizationError(ValueError):
    """A personalization or head request that cannot run as asked (too few rows, wrong mode, ...)."""


# --------------------------------------------------------------------------
# The global base model
# --------------------------------------------------------------------------


@dataclass
class GlobalBase:
    """A meta-trained global base model as a training run wrote it."""

    state: dict[str, dict[str, torch.Tensor]]
    config: RunConfig
    round: int
    data: bytes = field(repr=False)
    source: str
    version: int | None = None
    privacy: dict | None = None

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)

    @property
    def run_id(self) -> str:
        return f"{self.config.name}-{self.config.digest()[:12]}"

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.config.model.hidden)

    @property
    def adaptation(self) -> dict:
        """The shots, steps and rate the run evaluated personalization with: sensible defaults for this base."""
        ev = self.config.evaluation
        return {"shots": ev.shots, "steps": ev.steps, "lr": ev.lr if ev.lr is not None else self.config.algorithm.lr}

    def for_schema(self, schema: Schema) -> TrainedModel:
        """The base's weights paired with a site's schema (which must describe the same features and tasks)."""
        try:
            return TrainedModel(schema, self.hidden, {g: dict(v) for g, v in self.state.items()}, {"base": self.source})
        except ModelMismatchError as e:
            raise ModelMismatchError(f"base model {self.source}: {e}. Use the federation's schema; for a task new to it, use `fedmeta heads add`") from None


def _read_base(data: bytes, source: str, version: int | None = None) -> GlobalBase:
    try:
        raw = torch.load(io.BytesIO(data), weights_only=True)
        config = RunConfig.from_dict(raw["config"], source=source)
        return GlobalBase(unflatten_state(raw["state"]), config, int(raw["round"]), data, source, version, raw.get("privacy"))
    except Exception as e:
        raise PersonalizationError(f"{source} is not a fedmeta base model: {e}") from None


def load_base(source: str | Path, home: SiteHome | None = None) -> GlobalBase:
    """A base model from a run folder, a ``base_model.pt`` file, or a registry version (``v3``)."""
    path = Path(source)
    if path.is_dir():
        path = path / BASE_FILE
        if not path.exists():
            raise PersonalizationError(f"{source} has no {BASE_FILE}: is it a finished training run folder?")
    if path.is_file():
        return _read_base(path.read_bytes(), str(path))
    try:
        number = parse_version(str(source))
    except RegistryError:
        raise PersonalizationError(f"base model {source!r} is neither a run folder, a {BASE_FILE} file, nor a registry version like v3") from None
    if home is None:
        raise PersonalizationError(f"base model {source!r} is a registry version; give the site home that holds it")
    version = home.registry.get(number)
    if version.kind != "base":
        raise PersonalizationError(f"{version.label} is a {version.kind} model of site {version.site!r}, not a global base model")
    _, data = home.load(version, BASE_FILE)
    return _read_base(data, f"{home.path} {version.label}", version.version)


def register_base(home: SiteHome, base: GlobalBase, actor: str | None = None) -> ModelVersion:
    """Record the base in the registry (once: a known hash returns the existing version)."""
    if base.version is not None:
        return home.registry.get(base.version)
    manifest = Manifest(
        kind="base",
        model_file=BASE_FILE,
        sha256="",
        files={},
        run_id=base.run_id,
        training={"algorithm": base.config.algorithm.model_dump(mode="json"), "round": base.round, "hidden": list(base.hidden), "source": base.source},
        privacy=base.privacy,
    )
    version, _ = home.store({BASE_FILE: base.data}, manifest, actor=actor)
    base.version = version.version
    return version


# --------------------------------------------------------------------------
# Personalization
# --------------------------------------------------------------------------


@dataclass
class Personalization:
    """A personalized model and its held-out scores: ``<task>.base.<metric>`` and ``<task>.personalized.<metric>``."""

    model: TrainedModel
    metrics: dict[str, float]
    tasks: list[str]
    shots: int
    steps: int
    lr: float
    mode: str
    seed: int
    seconds: float
    steps_selection: dict | None = None


def check_shots(site: SiteData, task: str, shots: int) -> None:
    """Refuse K larger than the site's labelled training rows of ``task`` can supply."""
    spec = site.schema.task(task)
    have = site.n_labelled(task, train=True)
    need = shots * spec.n_classes if spec.is_classification else shots
    if have < need:
        per = f"K={shots} shots per class x {spec.n_classes} classes" if spec.is_classification else f"K={shots} shots"
        raise PersonalizationError(f"site {site.name!r}, task {task!r}: {per} need {need} labelled training rows, the site has {have}; lower --shots")


def support_sets(site: SiteData, tasks: list[str], shots: int, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """The K-shot support rows ``(x, y, w)`` per task that :func:`personalize` draws for this seed."""
    return {t: pair[0] for t, pair in _support_and_rest(site, tasks, shots, seed).items()}


def _support_and_rest(site: SiteData, tasks: list[str], shots: int, seed: int) -> dict[str, tuple[tuple, tuple]]:
    rng = np.random.default_rng(seed)
    return {t: site.sampler(t, shots, query_size=1, seed=rng).support_and_rest() for t in tasks}


def _fine_tune(
    trained: TrainedModel, supports: dict[str, tuple[torch.Tensor, ...]], names: list[str], steps: int, lr, checkpoints: tuple[int, ...] = ()
) -> dict[str, torch.Tensor] | dict[int, dict[str, torch.Tensor]]:
    """``steps`` full-batch SGD steps on the summed support losses; the body's gradient is averaged over tasks.

    With ``checkpoints``, returns the parameters after each of those step counts instead.
    """
    model = trained.module()
    losses = {t: make_loss(model, t) for t in supports}
    params = {k: v.detach().clone() for k, v in trained.params.items()}
    saved = {0: params} if 0 in checkpoints else {}
    for step in range(1, steps + 1):
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        current = {**params, **leaves}
        total = sum(losses[t](current, *support) for t, support in supports.items())
        grads = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
        update = {n: (g if g is not None else torch.zeros_like(leaves[n])) / (len(supports) if is_body_param(n) else 1) for n, g in zip(names, grads)}
        params = {k: v.detach() for k, v in sgd_update(params, update, lr).items()}
        if step in checkpoints:
            saved[step] = params
    return saved if checkpoints else params


AUTO_STEPS = (5, 10, 20, 40)


def _choose_steps(trained: TrainedModel, checkpoints: dict[int, dict[str, torch.Tensor]], rest: dict[str, tuple]) -> tuple[int, dict]:
    """The step count whose parameters have the lowest loss on the site's training rows outside the support."""
    model = trained.module()
    with torch.no_grad():
        scored = {
            steps: sum(float(make_loss(model, t)(params, *rows)) for t, rows in rest.items() if len(rows[1]))
            for steps, params in checkpoints.items()
        }
    best = min(scored, key=scored.get)
    return best, {"candidates": {str(k): round(v, 5) for k, v in scored.items()}, "rows": int(sum(len(r[1]) for r in rest.values()))}


def _support_loss(trained: TrainedModel, params: dict[str, torch.Tensor], supports: dict[str, tuple[torch.Tensor, ...]]) -> float:
    model = trained.module()
    with torch.no_grad():
        return float(sum(make_loss(model, t)(params, *support) for t, support in supports.items()))


def _check_converged(base: TrainedModel, params: dict[str, torch.Tensor], supports, lr: float | None) -> None:
    """Refuse a fine-tune that blew up (too high a rate) rather than publish garbage."""
    before, after = _support_loss(base, base.params, supports), _support_loss(base, params, supports)
    if not np.isfinite(after) or after > 10 * max(before, 1e-6):
        hint = f"lower --lr (now {lr:g}) or --steps" if lr is not None else "the learned Meta-SGD rates do not suit these steps; lower --steps"
        raise PersonalizationError(f"fine-tuning diverged: support loss went from {before:.4g} to {after:.4g}; {hint}")


def personalize(
    base: TrainedModel,
    site: SiteData,
    shots: int = 5,
    steps: int | str = 5,
    lr: float = 0.05,
    mode: Mode = "all",
    seed: int = 0,
) -> Personalization:
    """Fine-tune ``base`` on K shots per task of the site's training rows; score both on its held-out rows.

    ``mode``: ``"all"`` adapts every layer, ``"head"`` the task heads only,
    ``"metasgd"`` every layer with the per-parameter rates a Meta-SGD base
    learned (``lr`` is then unused).

    ``steps="auto"`` fine-tunes on the same K shots but chooses how long
    (5, 10, 20 or 40 steps) by the loss on the site's other labelled training
    rows, never its held-out rows; with no other rows it uses 5.

    >>> from fedmeta.data import hospital_federation
    >>> site = hospital_federation(n_sites=1)[0]
    >>> result = personalize(TrainedModel.initial(site.schema, hidden=(16,)), site, shots=5, steps=3)
    >>> sorted(result.metrics)[:2]
    ['length_of_stay.base.mse', 'length_of_stay.personalized.mse']
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise PersonalizationError(f"mode must be one of {list(MODES)}, got {mode!r}")
    auto = steps == "auto"
    if not auto and (not isinstance(steps, int) or steps < 0):
        raise PersonalizationError(f"steps must be a number >= 0 or 'auto', got {steps!r}")
    if shots < 1 or not lr > 0:
        raise PersonalizationError(f"need shots >= 1 and lr > 0; got shots={shots}, lr={lr}")
    tasks = [t for t in site.tasks if t in base.tasks]
    if not tasks:
        raise PersonalizationError(
            f"site {site.name!r} has no task with enough labelled rows to personalize "
            f"(each needs >= 4 training and >= 2 held-out rows; model tasks: {base.tasks})"
        )
    for t in tasks:
        check_shots(site, t, shots)
    rate: float | dict[str, torch.Tensor] = lr
    if mode == "metasgd":
        if "inner_lrs" not in base.state:
            raise PersonalizationError("mode 'metasgd' needs a base model meta-trained with algorithm metasgd (it has no learned rates)")
        rate = base.state["inner_lrs"]
    heads = [k for k in base.params if any(k.startswith(head_prefix(t)) for t in tasks)]
    names = heads if mode == "head" else [k for k in base.params if is_body_param(k)] + heads
    drawn = _support_and_rest(site, tasks, shots, seed)
    supports = {t: pair[0] for t, pair in drawn.items()}
    selection = None
    if auto:
        rest = {t: pair[1] for t, pair in drawn.items()}
        if any(len(rows[1]) for rows in rest.values()):
            checkpoints = _fine_tune(base, supports, names, max(AUTO_STEPS), rate, checkpoints=AUTO_STEPS)
            steps, selection = _choose_steps(base, checkpoints, rest)
            params = checkpoints[steps]
        else:
            steps, selection = AUTO_STEPS[0], {"note": "no training rows outside the support: default steps"}
            params = _fine_tune(base, supports, names, steps, rate)
    else:
        params = _fine_tune(base, supports, names, steps, rate)
    _check_converged(base, params, supports, lr if mode != "metasgd" else None)
    personalized = TrainedModel(base.schema, base.hidden, {**base.state, "params": params}, dict(base.info))
    model = base.module()
    metrics: dict[str, float] = {}
    for t in tasks:
        x_test, y_test = site.split(t, train=False)
        for label, p in (("base", base.params), ("personalized", params)):
            for name, value in task_scores(model, p, t, x_test, y_test).items():
                metrics[f"{t}.{label}.{name}"] = value
    result = Personalization(personalized, metrics, tasks, shots, steps, float(lr), mode, seed, time.perf_counter() - start)
    result.steps_selection = selection
    return result


# --------------------------------------------------------------------------
# Task heads
# --------------------------------------------------------------------------

MIN_HOLDOUT_ROWS = 20


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


def _holdout_split(y: np.ndarray, classification: bool, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Stratified 75/25 split when the rows allow a meaningful held-out score, else None."""
    n = len(y)
    if n < MIN_HOLDOUT_ROWS:
        return None
    rng = np.random.default_rng(seed)
    if not classification:
        order = rng.permutation(n)
        cut = int(round(n * 0.25))
        return np.sort(order[cut:]), np.sort(order[:cut])
    train, test = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        if len(rows) < 4:
            return None
        cut = max(1, int(round(len(rows) * 0.25)))
        test += list(rows[:cut])
        train += list(rows[cut:])
    return np.sort(train), np.sort(test)


def train_head(
    start: TrainedModel,
    task: TaskColumn,
    frame: pd.DataFrame,
    source: str,
    steps: int = 300,
    lr: float = 0.05,
    tune_body: bool = False,
    seed: int = 0,
) -> HeadResult:
    """Fit ``task``'s head on the labelled rows of ``frame`` on top of ``start``'s body.

    The body stays frozen (ANIL-style), or with ``tune_body`` moves at a
    tenth of the head's rate. A task the model already has starts from its
    current head; a new task from a zero head. With at least 20 labelled rows
    (and 4 per class) a stratified quarter is held out and scored, and the
    old head, if any, is scored on the same rows; otherwise the note says
    that no held-out score exists.
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
    labelled = frame[frame[task.label].notna()]
    if labelled.empty:
        raise SchemaError(f"{source}: label column {task.label!r} has no values")
    x = schema.encode(labelled)
    y = schema.labels(labelled, task.name)
    if task.is_classification:
        y = y.astype(np.int64)
        present = np.unique(y)
        if len(present) < 2:
            raise PersonalizationError(f"{source}: task {task.name!r} needs rows of at least two classes; all labelled rows are {task.classes[present[0]]!r}")
    split = _holdout_split(y, task.is_classification, seed)
    train_idx, test_idx = split if split is not None else (np.arange(len(y)), np.array([], np.int64))

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
        note = f"scored on {len(test_idx)} held-out rows of {len(y)} (stratified quarter)"
    else:
        note = (
            f"only {len(y)} labelled rows: no held-out score (needs >= {MIN_HOLDOUT_ROWS} rows"
            + (" and >= 4 per class)" if task.is_classification else ")")
            + "; the head was trained on all of them"
        )
    state = {"params": new_params}
    if "inner_lrs" in start.state:
        state["inner_lrs"] = {k: v for k, v in start.state["inner_lrs"].items() if not k.startswith(head_prefix(task.name))}
    trained = TrainedModel(schema, start.hidden, state, dict(start.info))
    return HeadResult(trained, task, metrics, len(y), len(test_idx), note, time.perf_counter() - began)


# --------------------------------------------------------------------------
# Publishing: export, manifest, registry
# --------------------------------------------------------------------------


@dataclass
class Published:
    version: ModelVersion
    created: bool
    promoted: bool
    manifest: Manifest
    export_seconds: float


def data_lineage(path: str | Path | None, **extra) -> dict:
    """Which rows produced a model: the file and its SHA-256 (rows never leave the site; their hash does not reveal them)."""
    out = dict(extra)
    if path is not None:
        out.update({"file": str(Path(path).resolve()), "sha256": sha256_file(path)})
    return out


def publish(
    home: SiteHome,
    trained: TrainedModel,
    kind: Literal["personalized", "head"],
    site: str,
    parent: ModelVersion,
    base: ModelVersion,
    metrics: dict,
    data: dict,
    training: dict,
    shots: int | None = None,
    personalized_tasks: list[str] | None = None,
    promote: bool | None = None,
    actor: str | None = None,
) -> Published:
    """Export ``trained``, write its version folder and manifest, register it; promote it if asked.

    ``promote=None`` promotes only when the site has no promoted version yet.
    """
    actor = actor or current_user()
    exported = export_onnx(trained)
    personalized_tasks = personalized_tasks or []
    manifest = Manifest(
        kind=kind,
        site=site,
        model_file="model.onnx",
        sha256="",
        files={},
        schema=trained.schema.model_dump(mode="json"),
        tasks=[TaskOutput(name=t.name, kind=t.kind, classes=t.classes, personalized=t.name in personalized_tasks) for t in trained.schema.tasks],
        base_version=base.version,
        base_sha256=base.sha256,
        run_id=base.lineage.get("run_id"),
        privacy=base.lineage.get("privacy"),
        data=data,
        shots=shots,
        training=training,
        metrics=metrics,
        export={"exporter": exported.exporter, "max_abs_diff": exported.max_abs_diff, "seconds": round(exported.seconds, 4), "opset": 18},
    )
    files = {"model.onnx": exported.onnx_bytes, "state.pt": trained.to_bytes()}
    version, created = home.store(files, manifest, parent=parent.version, actor=actor)
    promoted = False
    if promote or (promote is None and home.registry.current(site) is None):
        home.registry.promote(site, version.version, actor)
        promoted = True
    written, _ = home.load(version)
    return Published(version, created, promoted, written, exported.seconds)


def load_trained(home: SiteHome, version: ModelVersion) -> TrainedModel:
    """The torch weights of a registered site model (hash-verified), to keep training it."""
    if version.kind == "base":
        raise PersonalizationError(f"{version.label} is a global base model; load it with load_base")
    _, data = home.load(version, "state.pt")
    return TrainedModel.from_bytes(data, f"{home.folder(version) / 'state.pt'}")


def base_of(home: SiteHome, version: ModelVersion) -> ModelVersion:
    """The global base a site version descends from."""
    seen = version
    while seen.kind != "base":
        if seen.parent is None:
            raise RegistryError(f"{version.label} has no base model in its lineage")
        seen = home.registry.get(seen.parent)
    return seen
