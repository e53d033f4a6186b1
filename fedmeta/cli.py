"""The ``fedmeta`` command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

import fedmeta

app = typer.Typer(help="fedmeta: federated meta-learning with per-site personalization.", no_args_is_help=True)
synth_app = typer.Typer(help="Write seeded synthetic federations to disk.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
console = Console()


@app.command()
def version() -> None:
    """Print the fedmeta version."""
    console.print(f"fedmeta {fedmeta.__version__}")


@synth_app.command("hospitals")
def synth_hospitals(
    out: Path = typer.Argument(..., help="Folder to write one CSV per site and schema.json into."),
    sites: int = typer.Option(20, min=1, help="Number of hospitals."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write a hospital federation: per-site CSV files plus the shared schema."""
    from fedmeta.data import write_hospital_federation

    schema_path, paths = write_hospital_federation(out, n_sites=sites, seed=seed)
    console.print(f"wrote {len(paths)} site files and {schema_path}")


@synth_app.command("fraud")
def synth_fraud(
    out: Path = typer.Argument(..., help="Folder to write one CSV per bank and schema.json into."),
    banks: int = typer.Option(12, min=1, help="Number of banks."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write a fraud federation: banks with different fraud base rates and patterns."""
    from fedmeta.data.synthetic import write_fraud_federation

    schema_path, paths = write_fraud_federation(out, n_banks=banks, seed=seed)
    console.print(f"wrote {len(paths)} bank files and {schema_path}")


class _ProgressObserver:
    """A rich progress bar with round, loss and personalized metrics."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=console
        )

    def start(self, first_round: int, rounds: int) -> None:
        self.task = self.progress.add_task("", total=rounds, completed=first_round - 1)
        self.progress.start()

    def round_done(self, round_: int, train: dict | None) -> None:
        self.progress.update(self.task, completed=round_, description=f"loss {train['loss']:.4f}" if train else "skipped")

    def evaluated(self, model_round: int, evaluation: dict) -> None:
        parts = []
        for key, value in sorted(evaluation.items()):
            task, kind, metric = key.split(".")
            if metric in ("acc", "mse"):
                parts.append(f"{task} {kind[:4]} {metric} {value:.3f}")
        self.progress.console.print(f"round {model_round}: " + "  ".join(parts))

    def stop(self) -> None:
        self.progress.stop()


@app.command()
def train(
    config: Path = typer.Option(None, "--config", "-c", help="Run configuration (TOML). See examples/*.toml."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Folder for checkpoints and metrics (default runs/<name>)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder from its last completed round."),
    rounds: int = typer.Option(None, help="Override the number of rounds."),
    override: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set server.lr=0.5 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Meta-train a global base model in an embedded Flower simulation (no server to start)."""
    from fedmeta.fl.config import ConfigError, RunConfig
    from fedmeta.fl.run_dir import RunDir
    from fedmeta.fl.simulation import run_simulation

    try:
        if resume is not None:
            if config is not None or override:
                raise ConfigError("--resume continues a run with its saved configuration; drop --config/--set")
            cfg = RunDir(resume).load_config()
            if rounds is not None:
                cfg = cfg.model_copy(update={"rounds": rounds})
                from fedmeta.files import atomic_write_text

                atomic_write_text(RunDir(resume).config_path, cfg.to_toml())
            target = resume
        else:
            if config is None:
                raise ConfigError("give --config RUN.toml (see examples/) or --resume RUN_DIR")
            extra = list(override) + ([f"rounds={rounds}"] if rounds is not None else [])
            cfg = RunConfig.load(config, extra)
            target = run_dir or Path("runs") / cfg.name
        console.print(f"[bold]fedmeta train[/] {cfg.algorithm.name} on {cfg.federation.kind} ({cfg.federation.n_sites} sites), {cfg.rounds} rounds -> {target}")
        rd = run_simulation(cfg, target, resume=resume is not None, observer=_ProgressObserver(), verbose=verbose)
    except ConfigError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    except RuntimeError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    final = [r for r in rd.read_metrics() if r["site"] == "*" and r["phase"] == "evaluate"]
    if final:
        console.print(f"final evaluation (round {final[-1]['round']}):")
        for key, value in sorted(final[-1].items()):
            if key.count(".") == 2:
                console.print(f"  {key:45s} {value:.4f}")
    trained = [r for r in rd.read_metrics() if r["site"] == "*" and r["phase"] == "train"]
    if trained and "epsilon" in trained[-1]:
        last = trained[-1]
        console.print(f"privacy: client-level (site) DP, epsilon = {last['epsilon']:.3f} at delta = {last['delta']:g} after {last['round']} round(s)")
        if last["round"] < rd.load_config().rounds:
            console.print(f"[yellow]training stopped after round {last['round']}: the next round would exceed privacy.max_epsilon[/]")
    console.print(f"base model: {rd.base_model_path}")


# --------------------------------------------------------------------------
# Personalization, heads and the registry
# --------------------------------------------------------------------------

heads_app = typer.Typer(help="Train task heads for departments on the meta-learned body.", no_args_is_help=True)
models_app = typer.Typer(help="The site's model registry: versions, promotion, rollback, audit log.", no_args_is_help=True)
app.add_typer(heads_app, name="heads")
app.add_typer(models_app, name="models")

SITE_HOME_OPTION = typer.Option(None, "--site-home", envvar="FEDMETA_SITE_HOME", help="The site's home folder (registry + models). Default ./site-home.")


def _fail(error: Exception, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/] {error}")
    return typer.Exit(code)


def _user_errors() -> tuple[type[Exception], ...]:
    from fedmeta.data import SchemaError
    from fedmeta.fl.config import ConfigError
    from fedmeta.personalize import PersonalizationError
    from fedmeta.registry import RegistryError
    from fedmeta.trained import ModelMismatchError

    return (SchemaError, ConfigError, PersonalizationError, RegistryError, ModelMismatchError)


def _integrity_errors() -> tuple[type[Exception], ...]:
    from fedmeta.export import ExportError
    from fedmeta.manifest import ManifestError

    return (ExportError, ManifestError)


def _metrics_table(metrics: dict[str, float], before: str, after: str, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("task", "metric", before, after, "change"):
        table.add_column(column, justify="right" if column not in ("task", "metric") else "left")
    keys = sorted({(k.split(".")[0], k.split(".")[2]) for k in metrics if k.count(".") == 2})
    for task, metric in keys:
        b, a = metrics.get(f"{task}.{before}.{metric}"), metrics.get(f"{task}.{after}.{metric}")
        if a is None:
            continue
        change = "" if b is None else f"{a - b:+.4f}"
        table.add_row(task, metric, "" if b is None else f"{b:.4f}", f"{a:.4f}", change)
    return table


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


@app.command()
def personalize(
    data: Path = typer.Option(..., "--data", help="The site's rows (CSV or Parquet)."),
    schema: Path = typer.Option(..., "--schema", help="The federation's schema.json."),
    base: str = typer.Option(..., "--base", help="Global base model: a training run folder, a base_model.pt, or a registry version (v3)."),
    site: str = typer.Option(None, "--site", help="Site name (default: the data file's name)."),
    site_home: Path = SITE_HOME_OPTION,
    shots: int = typer.Option(None, "--shots", "-k", help="K: shots per class (rows for regression) per task. Default: the run's evaluation.shots."),
    steps: str = typer.Option(
        "auto", "--steps", help="Fine-tuning steps, or 'auto': 5, 10, 20 or 40, chosen by the loss on the site's training rows outside the K shots."
    ),
    lr: float = typer.Option(None, "--lr", help="Fine-tuning rate. Default: the run's adaptation rate."),
    mode: str = typer.Option("all", "--mode", help="all (every layer), head (task heads only) or metasgd (Meta-SGD's learned rates)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the support-set draw: the same seed gives the same model."),
    test_fraction: float = typer.Option(0.25, "--test-fraction", help="Share of the site's rows held out for scoring."),
    promote: bool = typer.Option(None, "--promote/--no-promote", help="Promote the new version (default: only if the site has none)."),
) -> None:
    """Fine-tune the global base model on K shots of a site's rows, export it to ONNX and register it."""
    import time

    from fedmeta.data import load_site
    from fedmeta.personalize import data_lineage, load_base, publish, register_base
    from fedmeta.personalize import personalize as run_personalize
    from fedmeta.registry import SiteHome

    start = time.perf_counter()
    try:
        home = SiteHome(site_home)
        global_base = load_base(base, home)
        defaults = global_base.adaptation
        site_data = load_site(data, schema, name=site, test_fraction=test_fraction, seed=global_base.config.federation.seed)
        result = run_personalize(
            global_base.for_schema(site_data.schema),
            site_data,
            shots=shots or defaults["shots"],
            steps=steps if steps == "auto" else _steps_number(steps),
            lr=lr or defaults["lr"],
            mode=mode,
            seed=seed,
        )
        base_version = register_base(home, global_base)
        published = publish(
            home,
            result.model,
            "personalized",
            site_data.name,
            parent=base_version,
            base=base_version,
            metrics=result.metrics,
            data=data_lineage(data, rows=site_data.n_rows, held_out=int(site_data.test_mask.sum()), test_fraction=test_fraction),
            training={"mode": result.mode, "steps": result.steps, "steps_selection": result.steps_selection, "lr": result.lr, "seed": result.seed, "seconds": round(result.seconds, 4)},
            shots=result.shots,
            personalized_tasks=result.tasks,
            promote=promote,
        )
    except _user_errors() as e:
        raise _fail(e) from None
    except _integrity_errors() as e:
        raise _fail(e, 1) from None
    chosen = " (auto)" if steps == "auto" else ""
    title = f"{site_data.name}: K={result.shots}, {result.steps} steps{chosen}, mode {result.mode}, held-out rows"
    console.print(_metrics_table(result.metrics, "base", "personalized", title))
    console.print(_published_line(published))
    console.print(f"done in {time.perf_counter() - start:.2f} s (fine-tuning {result.seconds:.2f} s, export {published.export_seconds:.2f} s)")


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
    seed: int = typer.Option(0, "--seed"),
    promote: bool = typer.Option(False, "--promote/--no-promote", help="Promote the new version."),
) -> None:
    """Train a head for a department's task on a few examples and register it as a new model version."""
    from fedmeta.data import read_table
    from fedmeta.personalize import base_of, data_lineage, head_task, load_trained, publish, train_head
    from fedmeta.registry import RegistryError, SiteHome, parse_version

    try:
        home = SiteHome(site_home)
        if start_from is not None:
            parent = home.registry.get(parse_version(start_from))
        else:
            parent = home.current(site)
        site = site or parent.site
        if parent.site != site:
            raise RegistryError(f"{parent.label} belongs to site {parent.site!r}, not {site!r}")
        start = load_trained(home, parent)
        already = [t.name for t in home.load(parent)[0].tasks if t.personalized and t.name != task]
        frame = read_table(data)
        column = head_task(start.schema, task, kind, label, [c.strip() for c in classes.split(",")] if classes else None, frame, str(data))
        result = train_head(start, column, frame, str(data), steps=steps, lr=lr, tune_body=tune_body, seed=seed)
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
        )
    except _user_errors() as e:
        raise _fail(e) from None
    except _integrity_errors() as e:
        raise _fail(e, 1) from None
    console.print(f"head {task!r} ({column.kind}{', classes ' + ', '.join(column.classes) if column.classes else ''}) on {parent.label}: {result.note}")
    if result.metrics:
        console.print(_metrics_table(result.metrics, "previous", "head", f"{site}: {task} head, held-out rows"))
    console.print(_published_line(published))


def _home(site_home: Path | None):
    from fedmeta.registry import SiteHome

    return SiteHome(site_home)


@models_app.command("list")
def models_list(
    site: str = typer.Option(None, "--site", help="Only this site's versions (and the bases)."),
    kind: str = typer.Option(None, "--kind", help="base, personalized or head."),
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """List model versions, marking each site's promoted one."""
    from rich.table import Table

    try:
        home = _home(site_home)
        versions = home.registry.versions(kind=kind)
        current = {s: home.registry.current(s) for s in home.registry.sites()}
    except _user_errors() as e:
        raise _fail(e) from None
    table = Table(title=f"models in {home.path}")
    for column in ("version", "kind", "site", "parent", "created", "by", "sha256", "promoted"):
        table.add_column(column)
    for v in versions:
        if site is not None and v.site not in (site, None):
            continue
        promoted = "*" if v.site and current.get(v.site) and current[v.site].version == v.version else ""
        parent = f"v{v.parent}" if v.parent else ""
        table.add_row(v.label, v.kind, v.site or "(global)", parent, v.created_at[:16].replace("T", " "), v.created_by, v.sha256[:12], promoted)
    console.print(table)


@models_app.command("show")
def models_show(version: str = typer.Argument(..., help="Version, e.g. v3."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Show a version's manifest (after checking its files' hashes) and lineage."""
    import json

    from fedmeta.registry import parse_version

    try:
        home = _home(site_home)
        v = home.registry.get(parse_version(version))
        manifest, _ = home.load(v)
    except _user_errors() as e:
        raise _fail(e) from None
    except _integrity_errors() as e:
        raise _fail(e, 1) from None
    data = manifest.model_dump(mode="json", by_alias=True, exclude={"schema_"})
    data = {"version": v.label, "parent": f"v{v.parent}" if v.parent else None, "folder": str(home.folder(v)), "hashes": "verified", **data}
    console.print_json(json.dumps(data))


@models_app.command("promote")
def models_promote(
    version: str = typer.Argument(..., help="Version to serve, e.g. v5."),
    site: str = typer.Option(None, "--site", help="The site (default: the version's own)."),
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """Make a version the site's current (served) model."""
    from fedmeta.registry import current_user, parse_version

    try:
        home = _home(site_home)
        v = home.registry.get(parse_version(version))
        home.load(v)  # never promote files that fail their hash check
        promoted = home.registry.promote(site or v.site or "", v.version, current_user())
    except _user_errors() as e:
        raise _fail(e) from None
    except _integrity_errors() as e:
        raise _fail(e, 1) from None
    console.print(f"site {promoted.site}: {promoted.label} is now current")


@models_app.command("rollback")
def models_rollback(site: str = typer.Option(None, "--site", help="The site (default: the only one)."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Return a site to the version promoted before the current one."""
    from fedmeta.registry import current_user

    try:
        home = _home(site_home)
        site = site or home.only_site()
        before = home.registry.current(site)
        after = home.registry.rollback(site, current_user())
    except _user_errors() as e:
        raise _fail(e) from None
    console.print(f"site {site}: rolled back from {before.label} to {after.label}")


@models_app.command("audit")
def models_audit(
    site: str = typer.Option(None, "--site"), limit: int = typer.Option(50, "--limit", help="Most recent entries to show."), site_home: Path = SITE_HOME_OPTION
) -> None:
    """Show the append-only audit log: who did what, when, to which version, with which hash."""
    from rich.table import Table

    try:
        entries = _home(site_home).registry.audit(site=site, limit=limit)
    except _user_errors() as e:
        raise _fail(e) from None
    table = Table(title="audit log")
    for column in ("#", "at", "actor", "action", "site", "version", "sha256", "detail"):
        table.add_column(column)
    for e in entries:
        detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if k != "path" and v is not None)
        table.add_row(str(e.id), e.at[:19].replace("T", " "), e.actor, e.action, e.site or "", f"v{e.version}" if e.version else "", (e.sha256 or "")[:12], detail)
    console.print(table)


# --------------------------------------------------------------------------
# The main job: demo and evaluation
# --------------------------------------------------------------------------


def _timed_progress():
    import time

    started = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f} s[/]  {message}")

    return progress


def _print_results(results) -> None:
    from rich.table import Table

    from fedmeta.evaluate import aggregate, gap_closed, method_label

    table = Table(title="held-out rows of every hospital (accuracy: mean over sites and classification tasks)")
    for column in ("method", "accuracy", "worst 10%", "AUC", "LOS MSE", "unseen: accuracy", "gap closed", "MB moved"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, r in results.items():
        seen, unseen = aggregate(r.seen), aggregate(r.unseen)
        gap = gap_closed(results, name)
        label = method_label(name)
        fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "—"  # noqa: E731
        table.add_row(label, fmt(seen, "acc"), fmt(seen, "worst10_acc"), fmt(seen, "auc"), fmt(seen, "mse"), fmt(unseen, "acc"),
                      "—" if gap is None else f"{gap:.0%}", "—" if r.bytes is None else f"{r.bytes / 1e6:.1f}")
    console.print(table)


def _serve_demo_site(out: Path, site: str, port: int) -> None:
    import json

    import pandas as pd
    import uvicorn

    from fedmeta.registry import SiteHome
    from serving import ServingSettings, create_app
    from serving.app import configure_logging
    from serving.auth import KeyStore

    home = SiteHome(out / "site-home")
    if site not in home.registry.sites():
        raise _fail(f"{out / 'site-home'} has no site {site!r}; sites: {', '.join(home.registry.sites()) or 'none (run fedmeta demo first)'}")
    csv = next((out / "data").glob(f"*/{site}.csv"))
    manifest, _ = home.load(home.current(site))
    features = [f["name"] for f in manifest.schema_["features"]]
    row = json.loads(pd.read_csv(csv).head(1)[features].to_json(orient="records"))[0]
    _, secret = KeyStore(home.path).create(f"demo-{site}", "predict")
    configure_logging()
    app_ = create_app(ServingSettings(site_home=home.path, site=site))
    body = json.dumps({"row": row})
    console.print(f"serving {site} {app_.state.fedmeta.store.current.label} on http://127.0.0.1:{port} (docs: /docs). Try, from another terminal:")
    typer.echo(f"curl -s http://127.0.0.1:{port}/v1/predict -H 'Authorization: Bearer {secret}' -H 'Content-Type: application/json' -d '{body}'")
    uvicorn.run(app_, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=10)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for data, runs, models and the report."),
    sites: int = typer.Option(47, "--sites", min=3, help="Hospitals to synthesize (a fifth never take part in training)."),
    rounds: int = typer.Option(20, "--rounds", min=1),
    algorithm: str = typer.Option("fomaml", "--algorithm", help="reptile, fomaml, maml, metasgd or anil."),
    shots: int = typer.Option(10, "--shots", "-k", min=1, help="K: shots per class for personalization."),
    seed: int = typer.Option(0, "--seed"),
    quick: bool = typer.Option(False, "--quick", help="A small run (6 hospitals, 3 rounds, small model) to check the pipeline."),
    serve_site: str = typer.Option(None, "--serve", help="After the demo (or on a finished one), serve this hospital's model."),
    port: int = typer.Option(8080, "--port", help="Port for --serve (127.0.0.1 only)."),
) -> None:
    """The whole story on one machine: synthesize hospitals, meta-train over Flower, personalize, export, register, compare."""
    from fedmeta.demo import run_demo

    if serve_site and (out / "site-home" / "registry.sqlite").exists():
        _serve_demo_site(out, serve_site, port)
        return
    if algorithm not in ("reptile", "fomaml", "maml", "metasgd", "anil"):
        raise _fail(f"--algorithm must be reptile, fomaml, maml, metasgd or anil, got {algorithm!r}")
    if quick:
        sites, rounds, shots, hidden = 6, 3, 5, (16, 16)
    else:
        hidden = (64, 64)
    if (out / "report.md").exists() or (out / "data").exists():
        raise _fail(f"{out} already holds a demo; choose another --out or remove it")
    console.print(f"[bold]fedmeta demo[/]: {sites} hospitals, {rounds} rounds of {algorithm}, K={shots} -> {out}")
    result = run_demo(out, n_sites=sites, rounds=rounds, algorithm=algorithm, shots=shots, seed=seed, hidden=hidden,
                      progress=_timed_progress(), observer=_ProgressObserver)
    _print_results(result.results)
    console.print(f"report: {result.report}   models: fedmeta models list --site-home {result.site_home}   ({result.seconds:.0f} s)")
    console.print(f"serve a hospital: fedmeta demo --out {out} --serve {result.sites[0]}")
    if serve_site:
        _serve_demo_site(out, serve_site, port)


@app.command("evaluate")
def evaluate_command(
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for data, runs and results."),
    sites: int = typer.Option(47, "--sites", min=3),
    rounds: int = typer.Option(20, "--rounds", min=1),
    shots: int = typer.Option(10, "--shots", "-k", min=1),
    algorithms: str = typer.Option("reptile,fomaml,maml,metasgd", "--algorithms", help="FedMeta algorithms to compare (comma-separated)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Compare local-only, pooled, FedAvg, FedAvg+FT and FedMeta algorithms on the same hospitals, splits and seeds."""
    from fedmeta.evaluate import evaluate, hospital_federation_on_disk
    from fedmeta.report import write_report

    chosen = tuple(a.strip() for a in algorithms.split(",") if a.strip())
    unknown = [a for a in chosen if a not in ("reptile", "fomaml", "maml", "metasgd", "anil")]
    if unknown:
        raise _fail(f"--algorithms: unknown {unknown}")
    if (out / "data").exists():
        raise _fail(f"{out} already holds an evaluation; choose another --out or remove it (`fedmeta report {out}` redraws its report)")
    progress = _timed_progress()
    fed = hospital_federation_on_disk(out / "data", n_sites=sites, seed=seed)
    results = evaluate(fed, out, algorithms=chosen, rounds=rounds, shots=shots, seed=seed, progress=progress, observer=_ProgressObserver)
    _print_results(results)
    path = write_report(out)
    console.print(f"report: {path}  results: {out / 'results.json'}")


@app.command("report")
def report_command(folder: Path = typer.Argument(..., help="An evaluation or demo folder (holding results.json).")) -> None:
    """Regenerate report.md and its PNG plots from a finished evaluation or demo."""
    from fedmeta.report import write_report

    try:
        path = write_report(folder)
    except FileNotFoundError as e:
        raise _fail(e) from None
    console.print(f"report: {path}")


# --------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------

def default_site_home() -> Path:
    from fedmeta.registry import default_site_home as default

    return default()


keys_app = typer.Typer(help="API keys of the site's prediction server (stored hashed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    site_home: Path = SITE_HOME_OPTION,
    site: str = typer.Option(None, "--site", help="Site to serve (default: the only site in the site home)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1 keeps it on this machine)."),
    port: int = typer.Option(8080, "--port"),
    max_rows: int = typer.Option(1024, "--max-rows", help="Rows per prediction request."),
    access_log: bool = typer.Option(False, "--access-log", help="Log one JSON line per request."),
) -> None:
    """Serve the site's promoted model: predictions, Open Inference Protocol v2, head requests, metrics."""
    import uvicorn

    from serving import ServingSettings, create_app
    from serving.app import configure_logging

    home = site_home or default_site_home()
    configure_logging(access_log)
    try:
        app_ = create_app(ServingSettings(site_home=home, site=site, max_rows=max_rows))
    except _user_errors() as e:
        raise _fail(e) from None
    except _integrity_errors() as e:
        raise _fail(f"refusing to start: {e}", 1) from None
    from serving.auth import KeyStore

    if not [k for k in KeyStore(home).keys() if not k.revoked_at]:
        console.print("[yellow]no API keys yet: every request will get 401. Create one with `fedmeta keys create --role predict --name APP`.[/]")
    current = app_.state.fedmeta.store.current
    console.print(f"serving {current.site} {current.label} (sha256 {current.version.sha256[:16]}...) on http://{host}:{port}  docs: /docs")
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=10)


@keys_app.command("create")
def keys_create(
    role: str = typer.Option(..., "--role", help="predict, department or admin."),
    name: str = typer.Option(..., "--name", help="Who or what uses the key (shown in the audit log)."),
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """Create an API key; its secret is printed once and only its hash is stored."""
    from serving.auth import KeyManagementError, KeyStore

    try:
        key, secret = KeyStore(site_home or default_site_home()).create(name, role)
    except KeyManagementError as e:
        raise _fail(e) from None
    console.print(f"key {key.id} ({key.role}) for {key.name}; keep this secret, it is not shown again:")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(site_home: Path = SITE_HOME_OPTION) -> None:
    """List keys (ids, names, roles; never secrets)."""
    from rich.table import Table

    from serving.auth import KeyManagementError, KeyStore

    try:
        keys = KeyStore(site_home or default_site_home()).keys()
    except KeyManagementError as e:
        raise _fail(e) from None
    table = Table(title="API keys")
    for column in ("id", "name", "role", "created", "revoked"):
        table.add_column(column)
    for k in keys:
        table.add_row(k.id, k.name, k.role, k.created_at, k.revoked_at or "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (from `fedmeta keys list`)."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Revoke a key; a running server stops accepting it within a second."""
    from serving.auth import KeyManagementError, KeyStore

    try:
        key = KeyStore(site_home or default_site_home()).revoke(key_id)
    except KeyManagementError as e:
        raise _fail(e) from None
    console.print(f"revoked key {key.id} ({key.name}, {key.role})")


if __name__ == "__main__":
    app()


certs_app = typer.Typer(help="TLS and site credentials for a federation on Flower's Deployment Engine.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")


def _certs(action):
    from fedmeta.fl.certs import CertificateError

    try:
        return action()
    except CertificateError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


@certs_app.command("ca")
def certs_ca(folder: Path = typer.Option(Path("federation-ca"), "--out", help="Where to write ca.crt and ca.key.")) -> None:
    """Create the federation's certificate authority. Keep ca.key offline; give ca.crt to every site."""
    from fedmeta.fl.certs import create_ca

    ca = _certs(lambda: create_ca(folder))
    console.print(f"CA certificate: {ca.certificate}\nCA key (keep it offline): {ca.key}")


@certs_app.command("server")
def certs_server(
    hosts: list[str] = typer.Argument(..., help="Every name or address sites use to reach the SuperLink, e.g. fl.example.org 10.0.0.5."),
    ca_folder: Path = typer.Option(Path("federation-ca"), "--ca", help="The folder with ca.crt and ca.key."),
    folder: Path = typer.Option(Path("superlink-tls"), "--out", help="Where to write server.pem and server.key."),
) -> None:
    """Sign the SuperLink's TLS certificate with the federation CA."""
    from fedmeta.fl.certs import CA, create_server_certificate

    cert, key = _certs(lambda: create_server_certificate(CA(ca_folder / "ca.crt", ca_folder / "ca.key"), folder, hosts))
    console.print(f"certificate: {cert}\nkey: {key}")
    console.print(
        f"start the SuperLink with: flower-superlink --ssl-ca-certfile {ca_folder / 'ca.crt'} --ssl-certfile {cert} "
        f"--ssl-keyfile {key} --enable-supernode-auth --disable-runtime-dependency-installation"
    )


@certs_app.command("site")
def certs_site(
    site: str = typer.Argument(..., help="The site's name, e.g. st-marys."),
    folder: Path = typer.Option(Path("site-keys"), "--out", help="Where to write <site>.key and <site>.pub."),
) -> None:
    """Create a site's SuperNode key pair: the private key stays at the site, the coordinator registers the public key."""
    from fedmeta.fl.certs import create_site_key

    private, public = _certs(lambda: create_site_key(folder, site))
    console.print(f"private key (stays at the site): {private}\npublic key (send to the coordinator): {public}")
    console.print(f"coordinator: flwr supernode register {public} <connection> --name {site}")
    console.print(f"site: flower-supernode --root-certificates ca.crt --auth-supernode-private-key {private} --superlink <coordinator>:<port> ...")
