"""``fedmeta personalize`` and ``fedmeta heads``: adapt the base model at a site, add task heads, register the results."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import UsageProblem, fail, integrity_errors, user_errors
from fedmeta.cli.options import SITE_HOME_OPTION, read_site_mapping
from fedmeta.cli.output import console, console_err

heads_app = typer.Typer(help="Train task heads for departments on the meta-learned body.", no_args_is_help=True)


def _metrics_table(metrics: dict[str, float], before: str, after: str, title: str, held_out: dict[str, int]):
    """Scores before and after, beside what ignoring the features scores (``<task>.baseline.<metric>``), what the site
    builds alone (``<task>.alone.<metric>``, where measured) and the rows they are measured on."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)  # fits 80 columns
    alone = any(k.split(".")[1:2] == ["alone"] for k in metrics)
    for column in ("task", "metric", "baseline", *(("alone",) if alone else ()), before, after, "change", "rows"):
        table.add_column(column, justify="right" if column not in ("task", "metric") else "left")
    keys = sorted({(k.split(".")[0], k.split(".")[2]) for k in metrics if k.count(".") == 2})
    for task, metric in keys:
        b, a = metrics.get(f"{task}.{before}.{metric}"), metrics.get(f"{task}.{after}.{metric}")
        if a is None:
            continue
        baseline = metrics.get(f"{task}.baseline.{metric}", 0.5 if metric == "auc" else None)
        change = "" if b is None else f"{a - b:+.4f}"
        rows = held_out.get(task)
        by_itself = metrics.get(f"{task}.alone.{metric}")
        table.add_row(task, metric, "" if baseline is None else f"{baseline:.4f}", *(("" if by_itself is None else f"{by_itself:.4f}",) if alone else ()),
                      "" if b is None else f"{b:.4f}", f"{a:.4f}", change, "" if rows is None else str(rows))
    return table


def _site_baselines(site_data, tasks: list[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Each task's baseline scores (``<task>.baseline.<metric>``) on the site's held-out rows, and how many rows those are."""
    from fedmeta.scoring import baseline_scores

    kinds = {t.name: t for t in site_data.schema.tasks}
    scores, rows = {}, {}
    for task in (t for t in tasks if t in site_data.scored_tasks):
        _, y_fit = site_data.split(task, train=True)
        _, y_held_out = site_data.split(task, train=False)
        rows[task] = len(y_held_out)
        for metric, value in baseline_scores(y_fit, y_held_out, kinds[task].is_classification).items():
            scores[f"{task}.baseline.{metric}"] = value
    return scores, rows


def _alone_scores(site_data, hidden: tuple[int, ...], tasks: list[str], seed: int) -> tuple[dict[str, float], str]:
    """``<task>.alone.<metric>`` on the held-out rows: the local model (logistic/ridge, gradient boosting or the MLP) the site's own cross-validation picks."""
    from fedmeta.evaluate.local import alone

    by_method, chosen = alone(site_data, hidden, seed)
    return {f"{t}.alone.{m}": v for t, scores in by_method[chosen].items() if t in tasks for m, v in scores.items()}, chosen


def _published_line(published) -> str:
    v = published.version
    state = "registered" if published.created else "identical to an existing version:"
    promoted = ", promoted" if published.promoted else ""
    return f"{state} {v.label} (site {v.site}{promoted}), sha256 {v.sha256[:16]}..., folder {v.path}"


def _steps_number(text: str) -> int:
    from fedmeta.personalize import PersonalizationError

    if not text.isdigit():
        raise PersonalizationError(f"--steps must be a number or 'auto', got {text!r}")
    return int(text)


def _shots_value(text: str | None) -> int | str | None:
    from fedmeta.personalize import PersonalizationError

    if text is None or text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise PersonalizationError(f"--shots must be a number >= 1 or 'all', got {text!r}")
    return int(text)


def personalize(
    data: Path = typer.Option(..., "--data", help="The site's training rows (CSV or Parquet)."),
    schema: Path = typer.Option(..., "--schema", help="The federation's schema.json."),
    base: str = typer.Option(..., "--base", help="Global base model: a training run folder, a base_model.pt, or a registry version (v3)."),
    region: str = typer.Option(
        None, "--region", help="Start from this region's base too (an unseen site of a known region); 'none': the global base only. "
        "Default: the region the site trained in, by the run folder's regions.json."
    ),
    site: str = typer.Option(None, "--site", help="Site name (default: the folder of a train.csv, else the data file's name)."),
    test: Path = typer.Option(None, "--test", help="The site's own test file (CSV or Parquet): scores are measured on it, and no rows are held out of --data. "
                              "A file that does not exist is skipped with a note (the site has none): rows are held out of --data instead."),
    site_home: Path = SITE_HOME_OPTION,
    shots: str = typer.Option(
        None, "--shots", "-k",
        help="K: shots per class (rows for regression) per task; or 'all': every labelled training row, with the steps and early stopping chosen on a "
        "validation fifth of them. Default: the run's evaluation.shots.",
    ),
    steps: str = typer.Option(
        "auto", "--steps", help="Fine-tuning steps, or 'auto': 5, 10, 20 or 40, chosen by the loss on the site's training rows outside the K shots "
        "(with --shots all: up to 1000, stopped early on the validation rows)."
    ),
    lr: float = typer.Option(None, "--lr", help="Fine-tuning rate. Default: the run's adaptation rate (with --shots all, Adam at 0.001)."),
    mode: str = typer.Option(
        "auto", "--mode", help="auto (default): per site, the best of --candidates on validation folds of the training rows; "
        "or one adaptation: all (every layer), head (task heads only) or metasgd (Meta-SGD's learned rates). "
        "--shots all or a number of --steps with auto means all.",
    ),
    candidates: str = typer.Option(
        "ditto,blend", "--candidates", help="With --mode auto, the adaptations weighed (comma-separated): base (unadapted), all_rows "
        "(every layer on all rows), ditto (the same, pulled toward the base, λ = 10), head (heads retrained on the frozen body), linear (the "
        "site's own cross-validated logistic/ridge regression), wide (the same beside the base body's features), blend (ditto and linear "
        "averaged), few_shot "
        "(K shots, as meta-trained), mix (base/local predictions mixed, α 0.25-1).",
    ),
    compare_alone: bool = typer.Option(
        True, "--alone/--no-alone", help="Also fit what the site builds alone (logistic/ridge regression, gradient boosting, the MLP: the one its "
        "own cross-validation picks) and show its held-out scores beside the personalized model's.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the support-set draw: the same seed gives the same model."),
    test_fraction: float = typer.Option(
        None, "--test-fraction", help="Share of the site's rows held out for scoring (between 0 and 1, exclusive). Default: the base's federation.test_fraction, so the rows held out are the ones training held out."
    ),
    promote: bool = typer.Option(None, "--promote/--no-promote", help="Promote the new version (default: only if the site has none)."),
    mapping: Path = typer.Option(
        None, "--mapping", help="The site's mapping.json (its own columns, codes and units to the schema's), applied to --data and --test, "
        "labels included, and recorded with the model. Default: the mapping.json beside --data, if there is one."
    ),
    accept_review: bool = typer.Option(
        False, "--accept-review", help="Personalize with a mapping whose columns are still flagged \"review\": true; the audit log records "
        "who accepted which columns. By default such a mapping is refused."
    ),
) -> None:
    """Fine-tune the global base model on K shots of a site's rows, export it to ONNX and register it."""
    import time

    from fedmeta.data import Schema, load_site
    from fedmeta.personalize import choose_personalization, load_base, load_regional_base, publish, register_base
    from fedmeta.personalize.regional import load_validation_base
    from fedmeta.personalize import personalize as run_personalize
    from fedmeta.personalize.choice import REGIONAL
    from fedmeta.registry import SiteHome

    start = time.perf_counter()
    if test is not None and not test.exists():
        # A site folder's test.csv is optional, so a loop over site folders passes one that may not be there: that site is
        # scored on rows held out of --data, as training scored it, rather than stopping the loop.
        console_err.print(f"note: test file {test} not found: this site has none, so it is scored on rows held out of --data (as in training)")
        test = None
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise UsageProblem(f"--test-fraction must be between 0 and 1 (exclusive): the site needs both training and held-out rows; got {test_fraction:g}")
    if test is not None and test_fraction is not None:
        raise UsageProblem("--test-fraction has no effect with --test: scores are measured on the test file and no rows are held out of --data")
    try:
        k = _shots_value(shots)
        home = SiteHome(site_home)
        global_base = load_base(base, home)
        if global_base.lineage is not None:
            name = global_base.lineage.get("region")
            raise UsageProblem(f"--base {base} is region {name}'s base, not the global one: give the run folder (or the global version) and --region {name}")
        defaults = global_base.adaptation
        federation = global_base.config.federation
        test_fraction = federation.test_fraction if test_fraction is None else test_fraction
        # Rows are normalized as the federation normalized them; the federation's seed and the site's name decide
        # the held-out rows, exactly as in training.
        site_schema = global_base.schema_for(Schema.load(schema), str(schema))
        site_mapping, accepted = read_site_mapping(data, mapping, accept_review)
        site_data = load_site(data, site_schema, name=site, test_fraction=test_fraction, seed=federation.seed, test_path=test, mapping=site_mapping)
        regional = load_regional_base(base, site_data.name, region, home, note=lambda text: console_err.print(f"note: {text}"))
        region_name = None if regional is None else regional.lineage.get("region")
        choosing = mode == "auto" and k != "all" and steps == "auto"
        weighed = [c.strip() for c in candidates.split(",") if c.strip()]
        if choosing and k is not None and "few_shot" not in weighed:
            raise UsageProblem(
                f"--shots {k} has no effect on the default choice, which fits every candidate on all the site's training rows: "
                "drop --shots, add few_shot to --candidates, or adapt on K shots with --mode all, head or metasgd"
            )
        if choosing:
            validation = None if region_name is None else load_validation_base(base, site_data.name, region_name)
            result = choose_personalization(
                global_base.for_schema(site_data.schema), site_data, shots=k or defaults["shots"], lr=lr or defaults["lr"], seed=seed,
                candidates=weighed, regional=None if regional is None else regional.for_schema(site_data.schema),
                regional_validation=None if validation is None else validation.for_schema(site_data.schema),
            )
        else:
            result = run_personalize(
                (regional or global_base).for_schema(site_data.schema),
                site_data,
                shots=k or defaults["shots"],
                steps=steps if steps == "auto" else _steps_number(steps),
                lr=lr or (None if k == "all" else defaults["lr"]),
                mode="all" if mode == "auto" else mode,
                seed=seed,
            )
        baselines, held_out = _site_baselines(site_data, result.tasks)
        if compare_alone:
            by_itself, alone_method = _alone_scores(site_data, global_base.hidden, result.tasks, seed)
            baselines.update(by_itself)
        base_version = register_base(home, global_base)
        # The regional base is a version of its own, under the global one, whether or not the choice keeps it: the table weighed it.
        regional_version = None if regional is None else register_base(home, regional, parent=base_version)
        from_region = regional is not None and (not choosing or result.steps_selection["chosen"].startswith(REGIONAL))
        start_version = regional_version if from_region else base_version
        published = publish(
            home,
            result.model,
            "personalized",
            site_data.name,
            parent=start_version,
            base=start_version,
            metrics={**result.metrics, **baselines},
            data=_lineage(data, test, site_data, test_fraction),
            training={"mode": result.mode, "shots": result.shots, "steps": result.steps, "steps_selection": result.steps_selection, "lr": result.lr,
                      "seed": result.seed, "seconds": round(result.seconds, 4), **({"region": region_name} if from_region else {})},
            shots=result.shots if isinstance(result.shots, int) else None,
            personalized_tasks=result.tasks,
            promote=promote,
            feature_ranges=site_data.feature_ranges(),
            mapping=site_mapping,
            review_accepted=bool(accepted),
        )
    except user_errors() as e:
        raise fail(e) from None
    except integrity_errors() as e:
        raise fail(e, 1) from None
    chosen = " (auto)" if steps == "auto" else ""
    if choosing:
        console.print(_choice_table(result.steps_selection, site_data.name))
        how = f"chosen on validation rows: {result.steps_selection['chosen']}" + (f" (regional: region {region_name}'s base)" if regional else "")
    elif result.shots == "all":
        rows = (result.steps_selection or {}).get("rows")
        from fedmeta.personalize.all_rows import stopping_note

        how = f"all {rows} labelled training rows, {result.steps} steps" + (f" ({stopping_note(result.steps_selection)})" if steps == "auto" else "")
    else:
        how = f"K={result.shots}, {result.steps} steps{chosen}"
    if regional is not None and not choosing:
        how = f"from region {region_name}'s base, {how}"
    scored = f"scores on {test}" if test is not None else "scores on held-out rows"
    title = f"{site_data.name}: {how}, mode {result.mode}; {scored}; baseline: majority class (acc) or mean (mse), ignoring the features"
    if compare_alone:
        title += f"; alone: the site's own model ({alone_method.removeprefix('local_').replace('only', 'MLP')}, picked by its cross-validation)"
    console.print(_metrics_table({**result.metrics, **baselines}, "base", "personalized", title, held_out))
    console.print(_published_line(published))
    console.print(f"done in {time.perf_counter() - start:.2f} s (fine-tuning {result.seconds:.2f} s, export {published.export_seconds:.2f} s)")


def _choice_table(why: dict, site: str):
    """Every candidate's validation accuracy and loss, the chosen one marked: why the site got its model."""
    from rich import box
    from rich.table import Table

    rows = why.get("validation_rows")
    folds = why.get("folds")
    title = f"{site}: candidates scored on {rows} labels of training rows, {folds} folds (each row validates once)" if rows else f"{site}: {why.get('note', '')}"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in ("candidate", "accuracy", "loss", ""):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for label, scores in why.get("validation", {}).items():
        acc = scores.get("acc")
        table.add_row(label, "" if acc is None else f"{acc:.4f}", f"{scores['loss']:.4f}", "chosen" if label == why["chosen"] else "")
    return table


def _lineage(data: Path, test: Path | None, site_data, test_fraction: float) -> dict:
    """Which rows trained and scored the model: the files and their hashes, and how the scored rows were chosen."""
    from fedmeta.personalize import data_lineage

    held_out = int(site_data.test_mask.sum())
    if test is not None:
        scored = data_lineage(test)
        return data_lineage(data, rows=site_data.n_rows - held_out, held_out=held_out, test_file=scored["file"], test_sha256=scored["sha256"])
    return data_lineage(data, rows=site_data.n_rows, held_out=held_out, test_fraction=test_fraction, held_out_rows_sha256=site_data.held_out_digest())


@heads_app.command("add")
def heads_add(
    task: str = typer.Option(..., "--task", help="Task name: one the federation knows, or a new one."),
    data: Path = typer.Option(..., "--data", help="A few labelled rows (CSV or Parquet): the schema's features plus the label column."),
    kind: str = typer.Option(None, "--kind", help="binary, multiclass or regression (required for a new task)."),
    label: str = typer.Option(None, "--label", help="Label column (default: the task's label in the schema, else the task name)."),
    classes: str = typer.Option(None, "--classes", help="Comma-separated class values of a new task (default: the values found)."),
    site: str = typer.Option(None, "--site", help="Site name (default: the only site in the site home)."),
    site_home: Path = SITE_HOME_OPTION,
    start_from: str = typer.Option(None, "--from", help="Model version to add the head to (default: the site's promoted version)."),
    steps: int = typer.Option(300, "--steps", help="Training steps (full batch, Adam)."),
    lr: float = typer.Option(0.05, "--lr", help="Head learning rate (the body, if tuned, moves at a tenth of it)."),
    tune_body: bool = typer.Option(False, "--tune-body", help="Lightly tune the body too (default: frozen, ANIL-style)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and of training: the same seed gives the same head."),
    promote: bool = typer.Option(False, "--promote/--no-promote", help="Promote the new version."),
    mapping: Path = typer.Option(
        None, "--mapping", help="The site's mapping.json (its own columns, codes and units to the schema's), applied to --data, the federation's "
        "task labels included, and recorded with the new version. Default: the mapping.json beside --data, if there is one."
    ),
    accept_review: bool = typer.Option(
        False, "--accept-review", help="Add the head with a mapping whose columns are still flagged \"review\": true; the audit log records "
        "who accepted which columns. By default such a mapping is refused."
    ),
) -> None:
    """Train a head for a department's task on a few examples and register it as a new model version."""
    from fedmeta.data import read_table
    from fedmeta.data.mapping import mapped_frame
    from fedmeta.personalize import base_of, data_lineage, head_task, load_trained, publish, train_head
    from fedmeta.registry import RegistryError, SiteHome, parse_version

    try:
        home = SiteHome.existing(site_home)
        if start_from is not None:
            parent = home.registry.get(parse_version(start_from))
        else:
            parent = home.current(site)
        site = site or parent.site
        if parent.site != site:
            raise RegistryError(f"{parent.label} belongs to site {parent.site!r}, not {site!r}")
        start = load_trained(home, parent)
        already = [t.name for t in home.load(parent)[0].tasks if t.personalized and t.name != task]
        site_mapping, accepted = read_site_mapping(data, mapping, accept_review)
        frame = read_table(data)
        if site_mapping is not None:
            frame = mapped_frame(site_mapping, frame, _federation_schema(home, parent), str(data), need_labels=False)
        column = head_task(start.schema, task, kind, label, [c.strip() for c in classes.split(",")] if classes else None, frame, str(data))
        result = train_head(start, column, frame, str(data), steps=steps, lr=lr, tune_body=tune_body, seed=seed, site=site)
        published = publish(
            home,
            result.model,
            "head",
            site,
            parent=parent,
            base=base_of(home, parent),
            metrics=result.metrics,
            data=data_lineage(data, rows=result.rows, held_out=result.holdout_rows),
            training={"task": task, "kind": column.kind, "steps": steps, "lr": lr, "tune_body": tune_body, "seed": seed, "note": result.note},
            personalized_tasks=already + [task],
            promote=promote,
            feature_ranges=result.feature_ranges,
            mapping=site_mapping,
            review_accepted=bool(accepted),
        )
    except user_errors() as e:
        raise fail(e) from None
    except integrity_errors() as e:
        raise fail(e, 1) from None
    console.print(f"head {task!r} ({column.kind}{', classes ' + ', '.join(column.classes) if column.classes else ''}) on {parent.label}: {result.note}")
    if result.metrics:
        console.print(_metrics_table(result.metrics, "previous", "head", f"{site}: {task} head; scores on held-out rows; baseline: majority class (acc) or mean (mse)", {task: result.holdout_rows}))
    console.print(_published_line(published))


def _federation_schema(home, version):
    """The schema a site's mapping is made for: the federation's, as the personalized version beneath ``version``'s heads
    recorded it (a head adds a task, so a head's own schema is the federation's no longer)."""
    from fedmeta.data import Schema
    from fedmeta.registry import RegistryError

    below = version
    while below.kind == "head":
        if below.parent is None:
            raise RegistryError(f"{version.label}: a head with no parent version in the registry")
        below = home.registry.get(below.parent)
    manifest, _ = home.load(below)
    if manifest.schema_ is None:
        raise RegistryError(f"{below.label} has no schema in its manifest: the mapping cannot be checked against it")
    return Schema.model_validate(manifest.schema_)
