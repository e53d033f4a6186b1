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
    console.print(f"base model: {rd.base_model_path}")


if __name__ == "__main__":
    app()
