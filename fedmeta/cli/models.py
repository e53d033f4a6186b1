"""``fedmeta models``: the site's registry: versions, promotion, rollback, audit log."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail, integrity_errors, user_errors
from fedmeta.cli.options import SITE_HOME_OPTION
from fedmeta.cli.options import open_home as _home
from fedmeta.cli.output import console

app = typer.Typer(help="The site's model registry: versions, promotion, rollback, audit log.", no_args_is_help=True)


@app.command("list")
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
    except user_errors() as e:
        raise fail(e) from None
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


@app.command("show")
def models_show(version: str = typer.Argument(..., help="Version, e.g. v3."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Show a version's manifest (after checking its files' hashes) and lineage."""
    import json

    from fedmeta.registry import parse_version

    try:
        home = _home(site_home)
        v = home.registry.get(parse_version(version))
        manifest, _ = home.load(v)
    except user_errors() as e:
        raise fail(e) from None
    except integrity_errors() as e:
        raise fail(e, 1) from None
    data = manifest.model_dump(mode="json", by_alias=True, exclude={"schema_"})
    data = {"version": v.label, "parent": f"v{v.parent}" if v.parent else None, "folder": str(home.folder(v)), "hashes": "verified", **data}
    console.print_json(json.dumps(data))


@app.command("promote")
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
    except user_errors() as e:
        raise fail(e) from None
    except integrity_errors() as e:
        raise fail(e, 1) from None
    console.print(f"site {promoted.site}: {promoted.label} is now current")


@app.command("rollback")
def models_rollback(site: str = typer.Option(None, "--site", help="The site (default: the only one)."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Return a site to the version promoted before the current one."""
    from fedmeta.registry import current_user

    try:
        home = _home(site_home)
        site = site or home.only_site()
        before = home.registry.current(site)
        after = home.registry.rollback(site, current_user())
    except user_errors() as e:
        raise fail(e) from None
    console.print(f"site {site}: rolled back from {before.label} to {after.label}")


@app.command("audit")
def models_audit(
    site: str = typer.Option(None, "--site"), limit: int = typer.Option(50, "--limit", help="Most recent entries to show."), site_home: Path = SITE_HOME_OPTION
) -> None:
    """Show the append-only audit log: who did what, when, to which version, with which hash."""
    from rich.table import Table

    try:
        entries = _home(site_home).registry.audit(site=site, limit=limit)
    except user_errors() as e:
        raise fail(e) from None
    table = Table(title="audit log")
    for column in ("#", "at", "actor", "action", "site", "version", "sha256", "detail"):
        table.add_column(column)
    for e in entries:
        detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if k != "path" and v is not None)
        table.add_row(str(e.id), e.at[:19].replace("T", " "), e.actor, e.action, e.site or "", f"v{e.version}" if e.version else "", (e.sha256 or "")[:12], detail)
