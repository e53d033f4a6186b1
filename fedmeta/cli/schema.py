"""``fedmeta schema infer``: propose a federation schema from site files, say what was decided, write it.

Files without a column they need are refused with one ``error:`` line each;
ignored columns that look like another column spelled differently get a
"did you mean" line at the end, where it is not lost among the decisions.
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
