"""``fedmeta demo``, ``evaluate`` and ``report``: the main job, the comparison of methods and its report."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail
from fedmeta.cli.options import Algorithm
from fedmeta.cli.output import ProgressObserver, console, timed_progress



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
        raise fail(f"{out / 'site-home'} has no site {site!r}; sites: {', '.join(home.registry.sites()) or 'none (run fedmeta demo first)'}")
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


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for data, runs, models and the report."),
    sites: int = typer.Option(47, "--sites", min=3, help="Hospitals to synthesize (a fifth never take part in training)."),
    rounds: int = typer.Option(20, "--rounds", min=1, help="Federated meta-training rounds."),
    algorithm: Algorithm = typer.Option(Algorithm.fomaml, "--algorithm", help="Meta-learning algorithm of the federated training."),
    shots: int = typer.Option(10, "--shots", "-k", min=1, help="K: shots per class for personalization."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic hospitals, the splits and training: the same seed gives the same table."),
    quick: bool = typer.Option(False, "--quick", help="A small run (6 hospitals, 3 rounds, small model) to check the pipeline."),
    serve_site: str = typer.Option(None, "--serve", help="After the demo (or on a finished one), serve this hospital's model."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port for --serve (127.0.0.1 only)."),
) -> None:
    """The whole story on one machine: synthesize hospitals, meta-train over Flower, personalize, export, register, compare."""
    from fedmeta.demo import run_demo

    if serve_site and (out / "site-home" / "registry.sqlite").exists():
        _serve_demo_site(out, serve_site, port)
        return
    algorithm = algorithm.value
    if quick:
        sites, rounds, shots, hidden = 6, 3, 5, (16, 16)
    else:
        hidden = (64, 64)
    if (out / "report.md").exists() or (out / "data").exists():
        raise fail(f"{out} already holds a demo; choose another --out or remove it")
    console.print(f"[bold]fedmeta demo[/]: {sites} hospitals, {rounds} rounds of {algorithm}, K={shots} -> {out}")
    result = run_demo(out, n_sites=sites, rounds=rounds, algorithm=algorithm, shots=shots, seed=seed, hidden=hidden,
                      progress=timed_progress(), observer=ProgressObserver)
    _print_results(result.results)
    console.print(f"report: {result.report}   models: fedmeta models list --site-home {result.site_home}   ({result.seconds:.0f} s)")
    console.print(f"serve a hospital: fedmeta demo --out {out} --serve {result.sites[0]}")
    if serve_site:
        _serve_demo_site(out, serve_site, port)


def evaluate_command(
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for data, runs and results."),
    sites: int = typer.Option(47, "--sites", min=3, help="Hospitals to synthesize (a fifth never take part in training)."),
    rounds: int = typer.Option(20, "--rounds", min=1, help="Federated rounds of every federated method."),
    shots: int = typer.Option(10, "--shots", "-k", min=1, help="K: shots per class for personalization and fine-tuning."),
    algorithms: str = typer.Option("reptile,fomaml,maml,metasgd", "--algorithms", help="FedMeta algorithms to compare, comma-separated: reptile, fomaml, maml, metasgd, anil."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic hospitals, the splits and training."),
) -> None:
    """Compare local-only, pooled, FedAvg, FedAvg+FT and FedMeta algorithms on the same hospitals, splits and seeds."""
    from fedmeta.evaluate import evaluate, hospital_federation_on_disk
    from fedmeta.report import write_report

    chosen = tuple(a.strip() for a in algorithms.split(",") if a.strip())
    unknown = [a for a in chosen if a not in ("reptile", "fomaml", "maml", "metasgd", "anil")]
    if unknown:
        raise fail(f"--algorithms: unknown {unknown}")
    if (out / "data").exists():
        raise fail(f"{out} already holds an evaluation; choose another --out or remove it (`fedmeta report {out}` redraws its report)")
    progress = timed_progress()
    fed = hospital_federation_on_disk(out / "data", n_sites=sites, seed=seed)
    results = evaluate(fed, out, algorithms=chosen, rounds=rounds, shots=shots, seed=seed, progress=progress, observer=ProgressObserver)
    _print_results(results)
    path = write_report(out)
    console.print(f"report: {path}  results: {out / 'results.json'}")


def report_command(folder: Path = typer.Argument(..., help="An evaluation or demo folder (holding results.json).")) -> None:
    """Regenerate report.md and its PNG plots from a finished evaluation or demo."""
    from fedmeta.report import write_report

    try:
        path = write_report(folder)
    except FileNotFoundError as e:
        raise fail(e) from None
    except ValueError:  # a results.json that is not JSON, or not ours
        raise fail(f"{folder / 'results.json'} is not a results file written by `fedmeta evaluate` or `fedmeta demo`") from None
    console.print(f"report: {path}")

