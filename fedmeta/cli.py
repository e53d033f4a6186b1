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


if __name__ == "__main__":
    app()
