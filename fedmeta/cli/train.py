"""``fedmeta train``: meta-train a global base model in an embedded Flower simulation."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.contributions import print_report
from fedmeta.cli.errors import fail
from fedmeta.cli.output import ProgressObserver, console
from fedmeta.fl.contribution_report import REPORT, load_report


def train(
    config: Path = typer.Option(None, "--config", "-c", help="Run configuration (TOML). See examples/*.toml."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Folder for checkpoints and metrics (default runs/<name>)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder from its last completed round."),
    rounds: int = typer.Option(None, help="Override the number of rounds."),
    override: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set server.lr=0.5 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
    accept_review: bool = typer.Option(
        False, "--accept-review", help="Train sites whose mapping.json still has columns flagged \"review\": true (each is listed); by default they are refused."
    ),
) -> None:
    """Meta-train a global base model in an embedded Flower simulation (no server to start)."""
    from fedmeta.fl.config import ConfigError, RunConfig
    from fedmeta.fl.run_dir import RunDir
    from fedmeta.fl.simulation import TrainingStopped, is_complete, run_simulation

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
            if is_complete(RunDir(resume), cfg):
                console.print(f"{resume} is complete: all {cfg.rounds} rounds ran and its base model is {RunDir(resume).base_model_path}. "
                              "To train further, resume with more rounds: --rounds N")
                return
        else:
            if config is None:
                raise ConfigError("give --config RUN.toml (see examples/) or --resume RUN_DIR")
            extra = list(override) + ([f"rounds={rounds}"] if rounds is not None else [])
            cfg = RunConfig.load(config, extra)
            target = run_dir or Path("runs") / cfg.name
        console.print(f"[bold]fedmeta train[/] {cfg.algorithm.name} on {_federation_line(cfg)}, {cfg.rounds} rounds -> {target}")
        if accept_review:
            for line in _under_review(cfg):
                console.print(f"[yellow]accepted without review (--accept-review):[/] {line}", highlight=False, soft_wrap=True)
        observer = ProgressObserver()
        rd = run_simulation(cfg, target, resume=resume is not None, observer=observer, verbose=verbose, accept_review=accept_review)
    except TrainingStopped as e:
        console.print(f"[yellow]{e}[/]")
        raise typer.Exit(130) from None
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
        console.print(f"privacy: client-level (site) DP at delta = {last['delta']:g} after {last['round']} round(s):")
        console.print(f"  epsilon = {last['epsilon']:.3f} against anyone who sees only the released models (the secret sample's amplification)")
        if "epsilon_known_sample" in last:
            console.print(f"  epsilon = {last['epsilon_known_sample']:.3f} against a participating site that learns who was sampled (SecAgg+ tells it)")
        if last["round"] < rd.load_config().rounds:
            console.print(f"[yellow]training stopped after round {last['round']}: the next round would exceed privacy.max_epsilon[/]")
    console.print(f"base model: {rd.base_model_path}")
    for line in regional_lines(rd.path):
        console.print(line, highlight=False, markup=False)
    try:
        report = load_report(rd.path)
    except ValueError as e:
        console.print(f"[yellow]{e}[/]", highlight=False)
    else:
        if report is not None:
            print_report(report, f"contributions ({rd.path / REPORT}; fedmeta contributions {rd.path})")
    for line in diverged_sites(observer.sat_out, rd.read_metrics()):
        console.print(f"[yellow]{line}[/]", highlight=False)
    # A site that raised is a fault to fix (a file, a bug): the model lacks its data, so scripts must notice. A site
    # that sat out a diverged round did what the protocol asks, and the run is whole.
    failed = observer.unplanned_failures()
    if failed:
        listed = "; ".join(f"{site} (round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, sorted(rounds)))}: {rounds[max(rounds)]})" for site, rounds in sorted(failed.items()))
        raise fail(f"{len(failed)} site(s) failed during training and the base model was made without them in those rounds: {listed}", 1)


def regional_lines(run_dir: Path) -> list[str]:
    """Where each region's base is, or why a region kept the global one (nothing for a run without regions)."""
    from fedmeta.fl.regions import load_regions, regional_base_path

    lines = []
    for region, entry in sorted(((load_regions(run_dir) or {}).get("regions") or {}).items()):
        path = regional_base_path(run_dir, region)
        lines.append(f"region {region}: " + (f"regional base {path} ({entry['rounds']} rounds on {len(entry['sites'])} sites)" if path else entry["note"]))
    return lines


def _rounds(rounds) -> str:
    return f"round{'s' if len(rounds) > 1 else ''} " + ", ".join(map(str, sorted(rounds)))


def diverged_sites(sat_out: dict[str, dict[int, str]], rows: list[dict]) -> list[str]:
    """What diverged local training cost a run: the sites that restarted with a smaller step, and those that sat out anyway."""
    restarted: dict[str, dict[int, int]] = {}
    for row in rows:
        if row["phase"] == "train" and row["site"] != "*" and row.get("restarts"):
            restarted.setdefault(row["site"], {})[row["round"]] = int(row["restarts"])
    lines = []
    if restarted:
        listed = "; ".join(f"{site} ({_rounds(r)}: {', '.join(str(r[k]) for k in sorted(r))} restart(s))" for site, r in sorted(restarted.items()))
        lines.append(f"{len(restarted)} site(s) restarted their local training with a smaller step after a non-finite loss or update: {listed}")
    if sat_out:
        listed = "; ".join(f"{site} ({_rounds(r)})" for site, r in sorted(sat_out.items()))
        lines.append(f"{len(sat_out)} site(s) sat out a round, their local training diverged on every restart; the run completed without their update there: {listed}")
    return lines


def _under_review(cfg) -> list[str]:
    """The sites' mapping columns still flagged for review (a CSV federation's ``<site>/mapping.json``)."""
    if cfg.federation.kind != "csv":
        return []
    from fedmeta.data.federation import discover_sites, under_review

    return under_review(discover_sites(cfg.federation.data_dir))


def _federation_line(cfg) -> str:
    """What the run trains on: a synthetic federation's size, or the sites found in a CSV federation's folder."""
    fed = cfg.federation
    if fed.kind != "csv":
        return f"{fed.kind} ({fed.n_sites} sites)"
    from fedmeta.data.federation import discover_sites

    sites = discover_sites(fed.data_dir)
    tested = sum(site.test is not None for site in sites)
    return f"{fed.data_dir} ({len(sites)} sites found" + (f", {tested} with a test file" if tested else "") + ")"
