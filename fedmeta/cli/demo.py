"""``fedmeta demo``, ``evaluate`` and ``report``: the main job, the comparison of methods and its report."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail
from fedmeta.cli.options import Algorithm
from fedmeta.cli.output import ProgressObserver, console, stage_progress



def print_results(folder: Path) -> None:
    """The table of ``report.md``, from ``results.json``: as a table where it fits, else one block per method (80 columns, logs)."""
    from rich.table import Table

    from fedmeta.evaluate import RESULT_COLUMNS, load_results, results_rows

    rows = results_rows(load_results(folder / "results.json"))
    title = "held-out rows of every site (accuracy: mean over sites and classification tasks)"
    if console.width >= 150:
        table = Table(title=title)
        for column in RESULT_COLUMNS:
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    console.print(title)
    for row in rows:
        console.print(f"[bold]{row[0]}[/]")
        console.print("  " + "   ".join(f"{c} {v}" for c, v in zip(RESULT_COLUMNS[1:5], row[1:5])))
        console.print("  " + "   ".join(f"{c} {v}" for c, v in zip(RESULT_COLUMNS[5:], row[5:])))


DEMO_KEY = "demo-key.txt"  # the demo's predict key, kept (mode 0600) in the demo folder so every --serve reuses it


def _demo_key(home) -> str:
    """The demo's predict key: created once, then read back (a demo site home on this machine, not a site's)."""
    import hashlib

    from fedmeta.files import atomic_write_text
    from serving.auth import KeyStore

    path = home.path.parent / DEMO_KEY
    store = KeyStore(home.path)
    if path.exists():
        secret = path.read_text().strip()
        live = {k.sha256 for k in store.keys() if not k.revoked_at}
        if hashlib.sha256(secret.encode()).hexdigest() in live:
            return secret
    _, secret = store.create("demo", "predict")
    atomic_write_text(path, secret + "\n", private=True)
    return secret


def _serve_demo_site(out: Path, site: str, port: int) -> None:
    import json

    import pandas as pd

    from fedmeta.cli.errors import port_in_use
    from fedmeta.registry import SiteHome
    from serving import ServingSettings, create_app
    from serving.app import configure_logging
    from serving.server import run

    home = SiteHome(out / "site-home")
    if site not in home.registry.sites():
        raise fail(f"{out / 'site-home'} has no site {site!r}; sites: {', '.join(home.registry.sites()) or 'none (run fedmeta demo first)'}")
    taken = port_in_use("127.0.0.1", port)
    if taken:
        raise fail(taken)
    csv = next((out / "data").glob(f"*/{site}.csv"))
    manifest, _ = home.load(home.current(site))
    features = [f["name"] for f in manifest.schema_["features"]]
    row = json.loads(pd.read_csv(csv).head(1)[features].to_json(orient="records"))[0]
    secret = _demo_key(home)
    configure_logging()
    app_ = create_app(ServingSettings(site_home=home.path, site=site))
    body = json.dumps({"row": row})
    console.print(f"serving {site} {app_.state.fedmeta.store.current.label} on http://127.0.0.1:{port}. Try, from another terminal:")
    typer.echo(f"curl -s http://127.0.0.1:{port}/v1/predict -H 'Authorization: Bearer {secret}' -H 'Content-Type: application/json' -d '{body}'")
    run(app_, "127.0.0.1", port)


SETTINGS_FILE = "settings.json"


def _continues(out: Path, settings: dict, kind: str, command: str) -> bool:
    """True if ``out`` holds this finished run; False to start (or continue) it. A folder of other settings is refused."""
    import json

    from fedmeta.files import atomic_write_json

    saved = out / SETTINGS_FILE
    if saved.exists():
        previous = json.loads(saved.read_text())
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            listed = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in changed.items())
            raise fail(f"{out} holds a {kind} with other settings: {listed}. Repeat its settings to continue it, or choose another --out")
        return (out / "report.md").exists() and (out / "results.json").exists()
    if out.exists() and any(out.iterdir()):
        raise fail(f"{out} is not empty and holds no {kind} settings ({SETTINGS_FILE}); choose another --out for `{command}`")
    atomic_write_json(saved, settings)
    return False


def _flags(settings: dict, quick: bool) -> str:
    sizes = " --quick" if quick else f" --sites {settings['sites']} --rounds {settings['rounds']} --shots {settings['shots']}"
    return f"{sizes} --algorithm {settings['algorithm']} --seed {settings['seed']}"


def _interruptible(work, again: str):
    """Run ``work``; on Ctrl-C say in one line how to continue (finished stages and training checkpoints are kept)."""
    from fedmeta.fl.simulation import TrainingStopped

    try:
        return work()
    except (KeyboardInterrupt, TrainingStopped):
        console.print(f"[yellow]stopped; finished stages and the last training round are kept. Continue with: {again}[/]")
        raise typer.Exit(130) from None


def console_hint(runs: Path) -> str:
    """The commands that open the coordinator console on ``runs`` (a key in a folder of its own, then the console)."""
    return (f"mkdir -p console-home && fedmeta keys create --role viewer --name me --site-home console-home && "
            f"fedmeta console --runs {runs} --site-home console-home (then open http://127.0.0.1:8090 and paste the key)")


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
    settings = {"sites": sites, "rounds": rounds, "algorithm": algorithm, "shots": shots, "seed": seed, "hidden": list(hidden)}
    if _continues(out, settings, "demo", "fedmeta demo"):
        print_results(out)
        console.print(f"{out} holds this demo, complete: report {out / 'report.md'}; models: fedmeta models list --site-home {out / 'site-home'}")
    else:
        console.print(f"[bold]fedmeta demo[/]: {sites} hospitals, {rounds} rounds of {algorithm}, K={shots} -> {out}")
        console.print(f"watch its rounds in a browser, from another terminal: {console_hint(out / 'runs')}", highlight=False, soft_wrap=True)
        result = _interruptible(lambda: run_demo(out, n_sites=sites, rounds=rounds, algorithm=algorithm, shots=shots, seed=seed, hidden=hidden,
                                                 progress=stage_progress(), observer=ProgressObserver), f"fedmeta demo --out {out}" + _flags(settings, quick))
        print_results(out)
        console.print(f"report: {result.report}   models: fedmeta models list --site-home {result.site_home}   ({result.seconds:.0f} s)")
    from fedmeta.registry import SiteHome

    console.print(f"serve a hospital: fedmeta demo --out {out} --serve {SiteHome(out / 'site-home').registry.sites()[0]}")
    if serve_site:
        _serve_demo_site(out, serve_site, port)


def evaluate_command(
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for data, runs and results."),
    config: Path = typer.Option(
        None, "--config", "-c",
        help="Evaluate on your own federation: a run configuration with federation.kind = \"csv\" and federation.data_dir. Its seed, test_fraction, "
             "rounds, model.hidden and algorithm are used; every method trains with the harness's one recipe.",
    ),
    unseen: str = typer.Option(None, "--unseen", help="With --config: sites (comma-separated names) kept out of training and scored after adaptation."),
    sites: int = typer.Option(None, "--sites", min=3, help="Synthetic hospitals to generate (default 47; a fifth never take part in training). Not with --config."),
    rounds: int = typer.Option(None, "--rounds", min=1, help="Federated rounds of every federated method (default 20, or the config's rounds)."),
    shots: int = typer.Option(10, "--shots", "-k", min=1, help="K: shots per class for personalization and fine-tuning."),
    algorithms: str = typer.Option(
        None, "--algorithms", help="FedMeta algorithms to compare, comma-separated: reptile, fomaml, maml, metasgd, anil (default: all but anil, or the config's algorithm)."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of the synthetic hospitals, the splits and training (default 0, or the config's seed)."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Also run the personalized-FL peers (Ditto, FedRep, FedPer, FedBABU, APFL, Per-FedAvg) and the pooled oracle with a site indicator."),
    accept_review: bool = typer.Option(
        False, "--accept-review", help="With --config: evaluate sites whose mapping.json still has columns flagged \"review\": true (each is listed); "
        "by default they are refused, as fedmeta train refuses them."
    ),
) -> None:
    """Compare local-only, pooled, FedAvg, FedAvg+FT, personalized-FL peers and FedMeta algorithms on the same sites, splits and seeds.

    Synthetic hospitals by default; with --config, the sites of your own federation folder, each scored on its
    test file where it has one (else on the rows its name and the federation's seed hold out).
    """
    from fedmeta.evaluate import evaluate, folder_federation, hospital_federation_on_disk
    from fedmeta.report import write_report

    run_config = _evaluation_config(config, sites, unseen)
    if accept_review and run_config is None:
        raise fail("--accept-review accepts the mappings of your own federation's sites: give --config too")
    default_algorithms = "reptile,fomaml,maml,metasgd"
    if run_config is not None:
        rounds = rounds or run_config.rounds
        seed = run_config.seed if seed is None else seed
        if algorithms is None and run_config.algorithm.name != "fedavg":
            default_algorithms = run_config.algorithm.name
    rounds, seed, sites = rounds or 20, seed or 0, sites or 47
    chosen = tuple(a.strip() for a in (algorithms or default_algorithms).split(",") if a.strip())
    unknown = [a for a in chosen if a not in ("reptile", "fomaml", "maml", "metasgd", "anil")]
    if unknown:
        raise fail(f"--algorithms: unknown {unknown}")
    held = sorted({s.strip() for s in (unseen or "").split(",") if s.strip()})
    settings = {"sites": sites, "rounds": rounds, "algorithms": list(chosen), "shots": shots, "seed": seed, "peers": peers}
    if run_config is not None:
        settings = {"config": str(config.resolve()), "data_dir": run_config.federation.data_dir, "unseen": held, "rounds": rounds,
                    "algorithms": list(chosen), "shots": shots, "seed": seed, "hidden": run_config.model.hidden, "peers": peers}
    if _continues(out, settings, "evaluation", "fedmeta evaluate"):
        print_results(out)
        console.print(f"{out} holds this evaluation, complete: report {out / 'report.md'}")
        return
    progress = stage_progress()

    def run() -> None:
        from fedmeta.evaluate.peers import PEERS

        if run_config is None:
            fed, hidden = hospital_federation_on_disk(out / "data", n_sites=sites, seed=seed), (64, 64)
        else:
            federation = run_config.federation
            fed = folder_federation(federation.data_dir, out / "data", held, federation.test_fraction, federation.seed, accept_review)
            for line in fed.review_accepted:
                console.print(f"[yellow]accepted without review (--accept-review):[/] {line}", highlight=False, soft_wrap=True)
            hidden = tuple(run_config.model.hidden)
            from fedmeta.data.federation import discover_sites

            with_test = sum(site.test is not None for site in discover_sites(federation.data_dir))
            progress(f"{federation.data_dir}: {len(fed.seen)} sites train, {len(fed.unseen)} never take part (unseen); "
                     f"{with_test} scored on their test file, the others on held-out rows")
        evaluate(fed, out, algorithms=chosen, rounds=rounds, hidden=hidden, shots=shots, seed=seed, progress=progress, observer=ProgressObserver,
                 peers=PEERS if peers else ())

    if run_config is None:
        again = f"fedmeta evaluate --out {out} --sites {sites} --rounds {rounds} --shots {shots} --algorithms {','.join(chosen)} --seed {seed}"
    else:
        again = f"fedmeta evaluate --out {out} --config {config}" + (f" --unseen {','.join(held)}" if held else "") + f" --rounds {rounds} --shots {shots} --algorithms {','.join(chosen)}"
    _interruptible(lambda: _user_errors(run), again + ("" if peers else " --no-peers") + (" --accept-review" if accept_review else ""))
    print_results(out)
    path = write_report(out)
    console.print(f"report: {path}  results: {out / 'results.json'}")


def _evaluation_config(config: Path | None, sites: int | None, unseen: str | None):
    """The run configuration behind ``--config``, checked: a csv federation, and no --sites beside it."""
    if config is None:
        if unseen:
            raise fail("--unseen names sites of your own federation: give --config too")
        return None
    if sites is not None:
        raise fail("--sites sizes the synthetic hospitals; with --config the sites are the ones in the config's data_dir")
    from fedmeta.fl.config import ConfigError, RunConfig

    try:
        run_config = RunConfig.load(config)
    except ConfigError as e:
        raise fail(e) from None
    if run_config.federation.kind != "csv":
        raise fail(f"{config}: fedmeta evaluate --config needs a federation folder ([federation] kind = \"csv\" and data_dir); "
                   f"this one is {run_config.federation.kind!r}")
    return run_config


def _user_errors(work):
    """``work()``, with a data problem (unreadable file, unknown site) as one line and exit 2."""
    from fedmeta.data import SchemaError

    try:
        return work()
    except SchemaError as e:
        raise fail(e) from None


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

