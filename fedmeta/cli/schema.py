"""``fedmeta schema infer`` and ``fedmeta schema match``.

``infer`` proposes a federation schema from site files, says what was
decided and writes it. Files without a column they need are refused with one
``error:`` line each; ignored columns that look like another column spelled
differently get a "did you mean" line at the end, where it is not lost among
the decisions.

``match`` runs at a site: it maps the site's own column names, codes and
units to the federation schema (:mod:`fedmeta.data.harmonize`), prints one
table and writes ``mapping.json``; ``--check`` validates a hand-edited
mapping against the site's rows. Nothing is sent anywhere.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import UsageProblem, fail
from fedmeta.cli.output import console

app = typer.Typer(help="Write and check the federation schema (features, their encoding and normalization, tasks).", no_args_is_help=True)


@app.command("infer")
def infer(
    data: list[Path] = typer.Argument(..., help="CSV/Parquet files, or a federation folder (<site>.csv or <site>/train.csv, optional <site>/test.csv)."),
    task: list[str] = typer.Option(..., "--task", help="NAME:KIND[:LABEL_COLUMN], KIND binary, multiclass or regression; the label column defaults to NAME (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Where to write the schema (JSON), e.g. DATA_DIR/schema.json for training."),
    name: str = typer.Option(None, "--name", help="The schema's name (default: the folder's name, else 'federation')."),
    categorical: list[str] = typer.Option([], "--categorical", help="Treat this column as categorical even if its values are numbers (repeatable)."),
    ignore: list[str] = typer.Option([], "--ignore", help="Leave this column out of the features, e.g. an identifier (repeatable)."),
    max_categories: int = typer.Option(50, "--max-categories", min=2, help="A text column with more distinct values is ignored (an identifier?) unless --categorical."),
    statistics: bool = typer.Option(
        False, "--statistics", help="Write numeric features' means and stds computed from the training rows of the files given (rows "
        "held out by --test-fraction and --seed left out). Default: leave them to the federation, which computes them from every site's training rows before round 1."
    ),
    test_fraction: float = typer.Option(
        0.25, "--test-fraction", help="With --statistics: the run's federation.test_fraction, so that the rows it will hold out stay out of the statistics."
    ),
    seed: int = typer.Option(0, "--seed", help="With --statistics: the run's federation.seed (the held-out rows follow from it and each site's name)."),
) -> None:
    """Propose a schema from site files: numeric vs categorical features (with categories), task classes, and how numbers are normalized."""
    from fedmeta.data.infer import TaskRequest, infer_schema, near_misses, read_tables
    from fedmeta.data.schema import SchemaProblems

    if not 0 < test_fraction < 1:
        raise UsageProblem(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction:g}")
    requests = [TaskRequest.parse(t) for t in task]
    tables = read_tables(data)
    if name is None:
        folders = [p for p in data if p.is_dir()]
        name = folders[0].resolve().name if len(folders) == 1 else "federation"
    try:
        schema, decisions = infer_schema(
            tables, requests, name=name, categorical=tuple(categorical), ignore=tuple(ignore), max_categories=max_categories, statistics=statistics,
            test_fraction=test_fraction, seed=seed,
        )
    except SchemaProblems as e:
        for line in e.lines:
            exit_ = fail(line)
        raise exit_ from None
    for d in decisions:
        console.print(f"  {d.role:12s} {d.column:24s} {d.detail}", markup=False, highlight=False)
    numeric = sum(f.type == "numeric" for f in schema.features)
    training = sum(len(t) for t in tables.training_rows(test_fraction, seed).values())
    source = (
        f"computed from the training rows of the {len(tables.train)} training file(s) given ({training} of {tables.rows} rows: "
        f"those a run with test_fraction {test_fraction:g} and seed {seed} holds out are left out)"
        if statistics
        else "left to the federation: `fedmeta train` computes them from every site's training rows before round 1 (--statistics to write them now)"
    )
    console.print(
        f"normalization: means and stds of {numeric} numeric feature(s) {source}"
        + (f"; the {len(tables.test)} test file(s) only added categories and classes" if tables.test else ""),
        highlight=False,
    )
    replaced = out.exists()
    schema.save(out)
    console.print(
        f"{'replaced' if replaced else 'wrote'} {out}: {len(schema.features)} features ({numeric} numeric, {len(schema.features) - numeric} categorical; "
        f"{schema.encoded_dim} model inputs), {len(schema.tasks)} task(s). Check the decisions above; edit the file or rerun with --categorical/--ignore to change them.",
        highlight=False,
    )
    for line in near_misses(tables, decisions, asked=tuple(ignore)):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("match")
def match(
    data: list[Path] = typer.Argument(..., help="The site's CSV/Parquet file(s); each gets its own mapping."),
    schema_path: Path = typer.Option(..., "--schema", help="The federation's schema.json (its synonyms, units and published statistics help)."),
    out: Path = typer.Option(
        None, "--out", help="Where to write the mapping: a file for one data file, a folder for several (FOLDER/<file stem>.mapping.json). "
        "Default: where training, personalize and predict pick it up: <site>/mapping.json for a site folder's train.csv or test.csv, "
        "else <file stem>.mapping.json beside the file."
    ),
    check: bool = typer.Option(False, "--check", help="Do not match: validate the existing mapping (at --out, or beside the file) against the site's rows."),
    base: Path = typer.Option(
        None, "--base", help="A base model (run folder or base_model.pt) whose normalization statistics (means, stds) serve as value evidence "
        "where the schema publishes none: units and decoys are then checked against the federation's values."
    ),
) -> None:
    """Map this site's columns, codes and units to the federation schema; print the decisions and write mapping.json (values never leave the site)."""
    from fedmeta.cli.output import print_rows
    from fedmeta.data.schema import Schema

    schema = Schema.load(schema_path)
    if base is not None:
        from fedmeta.personalize.base import load_base

        statistics = load_base(base).statistics or {}
        numeric = {f.name for f in schema.features if f.type == "numeric"}
        schema = schema.with_statistics({k: v for k, v in statistics.items() if k in numeric})
    targets = _mapping_paths(data, out)
    problems = 0
    for path, target in zip(data, targets):
        if check:
            problems += _check_one(path, target, schema)
            continue
        from fedmeta.data.harmonize.match import match_frame
        from fedmeta.data.site import read_table

        result = match_frame(schema, read_table(path))
        rows = [[d.column, d.target or "(ignored)", d.transform(), f"{d.confidence:.2f}", "review" if d.review else "", d.evidence] for d in result.decisions]
        rows += [["(none)", name, "", "", "unmapped", "no column of this file matches: map one by hand"] for name in result.unmapped]
        print_rows(f"{path} -> schema {schema.name!r}", ["site column", "feature", "transform", "confidence", "review", "evidence"], rows)
        result.mapping.save(target)
        pending = sum(d.review for d in result.decisions)
        console.print(
            f"wrote {target}: {sum(d.target is not None for d in result.decisions)} column(s) mapped, "
            f"{sum(d.target is not None and (d.scale, d.offset) != (1.0, 0.0) for d in result.decisions)} converted, {pending} to review"
            + (f", {len(result.unmapped)} schema column(s) unmapped" if result.unmapped else "")
            + (". Check the rows marked review, edit the file, set \"review\": false and run again with --check." if pending or result.unmapped else "."),
            highlight=False, markup=False,
        )
    if problems:
        raise typer.Exit(1)


def _mapping_paths(data: list[Path], out: Path | None) -> list[Path]:
    """Each data file's mapping file (see ``--out``); two files may not share one."""
    from fedmeta.data.mapping import MAPPING_FILE

    if out is None:
        # Where training and personalize look: a site folder's train/test files share <site>/mapping.json; a site file has its own.
        paths = [p.parent / MAPPING_FILE if p.stem in ("train", "test") else p.with_name(f"{p.stem}.{MAPPING_FILE}") for p in data]
    elif len(data) == 1 and not out.is_dir():
        paths = [out]
    else:
        if out.exists() and not out.is_dir():
            raise UsageProblem(f"--out {out}: with {len(data)} data files, --out is a folder (one mapping per file), not a file")
        paths = [out / f"{p.stem}.mapping.json" for p in data]
    seen: dict[Path, Path] = {}
    for p, m in zip(data, paths):
        if m in seen:
            raise UsageProblem(f"{seen[m]} and {p} would both write {m}; give --out a folder, or match one file at a time")
        seen[m] = p
    return paths


def _check_one(path: Path, mapping_path: Path, schema) -> int:
    """Validate one mapping against one file's rows: one line per problem; returns how many."""
    from fedmeta.data.mapping import Mapping, check, pending_review
    from fedmeta.data.site import read_table

    try:
        mapping = Mapping.load(mapping_path)
    except ValueError as e:
        fail(e)
        return 1
    problems = check(mapping, read_table(path), schema, str(path))
    for line in problems:
        fail(line)
    pending = pending_review(mapping)
    for line in pending:
        console.print(f"{mapping_path}: review pending: {line}", highlight=False, markup=False, soft_wrap=True)
    verdict = "fits" if not problems else f"does not fit ({len(problems)} problem(s))"
    console.print(f"{mapping_path} {verdict} {path}" + (f"; {len(pending)} column(s) still flagged for review" if pending else ""), highlight=False, markup=False)
    return len(problems)
