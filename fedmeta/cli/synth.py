"""``fedmeta synth``: seeded synthetic federations on disk."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.output import console

app = typer.Typer(help="Write seeded synthetic federations to disk.", no_args_is_help=True)


@app.command("hospitals")
def synth_hospitals(
    out: Path = typer.Argument(..., help="Folder to write one CSV per site and schema.json into."),
    sites: int = typer.Option(20, min=1, help="Number of hospitals."),
    seed: int = typer.Option(0, help="Random seed."),
    regions: int | None = typer.Option(
        None, help="Deal the hospitals round-robin into N regions (2 to --sites) that differ in case mix and outcome rates; "
        "each site is written to <region>/<site>.csv. Default: no regions, one folder of sites."
    ),
) -> None:
    """Write a hospital federation: per-site CSV files plus the shared schema."""
    from collections import Counter

    from fedmeta.cli.errors import UsageProblem
    from fedmeta.data import write_hospital_federation

    if regions is not None and not 2 <= regions <= sites:
        raise UsageProblem(f"--regions {regions}: a regional federation needs between 2 and --sites ({sites}) regions")
    schema_path, paths = write_hospital_federation(out, n_sites=sites, seed=seed, regions=regions)
    if regions is None:
        console.print(f"wrote {len(paths)} site files and {schema_path}")
        return
    per_region = ", ".join(f"{region} {count}" for region, count in sorted(Counter(p.parent.name for p in paths).items()))
    console.print(f"wrote {len(paths)} site files in {regions} region folders (sites per region: {per_region}) and {schema_path}")


@app.command("fraud")
def synth_fraud(
    out: Path = typer.Argument(..., help="Folder to write one CSV per bank and schema.json into."),
    banks: int = typer.Option(12, min=1, help="Number of banks."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write a fraud federation: banks with different fraud base rates and patterns."""
    from fedmeta.data.synthetic import write_fraud_federation

    schema_path, paths = write_fraud_federation(out, n_banks=banks, seed=seed)
    console.print(f"wrote {len(paths)} bank files and {schema_path}")


@app.command("clinics")
def synth_clinics(
    out: Path = typer.Argument(..., help="Folder to write one folder per clinic (train.csv and test.csv) into; no schema."),
    sites: int = typer.Option(8, min=1, help="Number of clinics drawn (clinics that record neither task are left out)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write a clinic network as users bring one: <clinic>/train.csv and <clinic>/test.csv, two tasks, some labels missing, no schema."""
    from fedmeta.data.synthetic import write_clinic_federation

    folders = write_clinic_federation(out, n_sites=sites, seed=seed)
    console.print(f"wrote {len(folders)} clinic folders (train.csv and test.csv) in {out}; next: fedmeta schema infer {out} --task ... --out {out}/schema.json")
