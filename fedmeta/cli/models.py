"""``fedmeta models``: the site's registry: versions, promotion, rollback, audit log."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path

import typer

from fedmeta.cli.errors import fail
from fedmeta.cli.options import SITE_HOME_OPTION
from fedmeta.cli.options import open_home as _home
from fedmeta.cli.output import console, print_json, print_rows

app = typer.Typer(help="The site's model registry: versions, promotion, rollback, audit log.", no_args_is_help=True)


class Kind(str, Enum):
    base = "base"
    personalized = "personalized"
    head = "head"


def scores_summary(v) -> str:
    """A version's held-out scores, each beside its feature-blind baseline: ``mortality acc 0.812 (baseline 0.650)``."""
    parts = []
    for key, value in sorted(v.metrics.items()):
        if key.count(".") != 2 or not isinstance(value, (int, float)):
            continue
        task, label, metric = key.split(".")
        if label not in ("personalized", "head"):
            continue
        baseline = v.metrics.get(f"{task}.baseline.{metric}", 0.5 if metric == "auc" else None)
        parts.append(f"{task} {metric} {value:.3f}" + ("" if baseline is None else f" (baseline {baseline:.3f})"))
    return "; ".join(parts)


def level(v) -> str:
    """Where a version sits in the chain global > region > site > head."""
    if v.kind == "base":
        return "region" if v.lineage.get("region") else "global"
    return "head" if v.kind == "head" else "site"


def site_text(v) -> str:
    return v.site or (f"(region {v.lineage['region']})" if v.lineage.get("region") else "(global)")


def chain(v, get) -> list[str]:
    """The labels from the global base down to ``v``, by ``parent`` links (``get`` reads a version by number)."""
    labels, seen = [v.label], {v.version}
    while v.parent is not None and v.parent not in seen:  # a registry never loops; a hand-edited one must not hang the listing
        v = get(v.parent)
        seen.add(v.version)
        labels.append(v.label)
    return labels[::-1]


JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document on standard output instead of a table.")


def version_record(v, promoted: bool, lineage: list[str] | None = None) -> dict:
    """A version as ``models list --json`` prints it: full hashes, metrics and lineage, no formatting."""
    return {
        "version": v.label, "kind": v.kind, "level": level(v), "region": v.lineage.get("region"), "site": v.site,
        "parent": f"v{v.parent}" if v.parent else None, "lineage": lineage or [v.label], "created_at": v.created_at,
        "created_by": v.created_by, "sha256": v.sha256, "promoted": promoted, "tasks": list(v.lineage.get("tasks") or []),
        "held_out_rows": (v.lineage.get("data") or {}).get("held_out"), "metrics": v.metrics,
    }


@app.command("list")
def models_list(
    site: str = typer.Option(None, "--site", help="Only this site's versions (and the bases)."),
    kind: Kind = typer.Option(None, "--kind", help="Only versions of this kind."),
    as_json: bool = JSON_OPTION,
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """List model versions with their tasks and held-out scores, marking each site's promoted one."""
    home = _home(site_home)
    versions = home.registry.versions(kind=None if kind is None else kind.value)
    current = {s: home.registry.current(s) for s in home.registry.sites()}
    shown = [v for v in versions if site is None or v.site in (site, None)]
    promoted = {v.version: bool(v.site and current.get(v.site) and current[v.site].version == v.version) for v in shown}
    by_number = {v.version: v for v in versions}
    get = lambda n: by_number.get(n) or home.registry.get(n)  # noqa: E731 (a --kind listing still walks through the other kinds)
    chains = {v.version: chain(v, get) for v in shown}
    if as_json:
        print_json({"site_home": str(home.path), "versions": [version_record(v, promoted[v.version], chains[v.version]) for v in shown]})
        return
    rows = []
    for v in shown:
        held_out = (v.lineage.get("data") or {}).get("held_out")
        rows.append([v.label, v.kind, site_text(v), "promoted" if promoted[v.version] else "", " > ".join(chains[v.version]),
                     v.created_at[:16].replace("T", " "), v.created_by, v.sha256[:12], ", ".join(v.lineage.get("tasks") or []), scores_summary(v),
                     "" if held_out is None else str(held_out)])
    columns = ["version", "kind", "site", "promoted", "lineage", "created", "by", "sha256", "tasks", "held-out scores", "held-out rows"]
    print_rows(f"models in {home.path}", columns, rows, heading=4)


@app.command("show")
def models_show(version: str = typer.Argument(..., help="Version, e.g. v3."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Show a version's manifest (after checking its files' hashes) and lineage."""
    import json

    from fedmeta.registry import parse_version

    home = _home(site_home)
    v = home.registry.get(parse_version(version))
    manifest, _ = home.load(v)
    data = manifest.model_dump(mode="json", by_alias=True, exclude={"schema_"})
    data = {"version": v.label, "parent": f"v{v.parent}" if v.parent else None, "lineage": chain(v, home.registry.get), "level": level(v),
            "folder": str(home.folder(v)), "hashes": "verified", **data}
    console.print_json(json.dumps(data))


@app.command("promote")
def models_promote(
    version: str = typer.Argument(..., help="Version to serve, e.g. v5."),
    site: str = typer.Option(None, "--site", help="The site (default: the version's own)."),
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """Make a version the site's current (served) model."""
    from fedmeta.registry import current_user, parse_version

    home = _home(site_home)
    v = home.registry.get(parse_version(version))
    broken = home.verify_files(v)  # never promote files that fail their hash check
    if broken:
        raise fail(broken[0], 1)
    promoted = home.registry.promote(site or v.site or "", v.version, current_user())
    console.print(f"site {promoted.site}: {promoted.label} is now current")


@app.command("rollback")
def models_rollback(site: str = typer.Option(None, "--site", help="The site (default: the only one)."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Return a site to the version promoted before the current one."""
    from fedmeta.registry import current_user

    home = _home(site_home)
    site = site or home.only_site()
    before = home.registry.current(site)
    after = home.registry.rollback(site, current_user())
    console.print(f"site {site}: rolled back from {before.label} to {after.label}")


@app.command("audit")
def models_audit(
    site: str = typer.Option(None, "--site", help="Only this site's entries."),
    limit: int = typer.Option(50, "--limit", min=1, help="Most recent entries to show."),
    verify: bool = typer.Option(False, "--verify", help="Check the hash chain, the versions and promotions against it, and every version's files; exit 1 on any break."),
    expect: str = typer.Option(None, "--expect", metavar="COUNT:SHA256",
                               help="With --verify: also fail unless entry COUNT still has this hash (a head printed by --head and kept elsewhere)."),
    head: bool = typer.Option(False, "--head", help="Print only the chain head, COUNT:SHA256, after checking the chain; keep it outside this machine."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries and the chain head as one JSON document on standard output instead of a table."),
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """Show the audit log (who did what, when, to which version, with which hash) and its chain head."""
    from rich.markup import escape
    from rich.table import Table

    from fedmeta.registry import REGISTRY_FILE, ChainHead

    anchor = None if expect is None else ChainHead.parse(expect)  # a malformed head is a usage error (exit 2) before anything is read
    if anchor is not None and not verify:
        raise fail("--expect needs --verify: `fedmeta models audit --verify --expect COUNT:SHA256`")
    if as_json and (verify or head):
        raise fail("--json lists the log: use it without --verify and --head")
    home = _home(site_home)
    if head:
        result = home.registry.verify()
        if not result.ok:  # a head is recorded to vouch for the chain: never print one for a chain that does not verify
            raise fail(f"{home.path / REGISTRY_FILE}: no chain head printed, the audit log does not verify: {result.problems[0]}", 1)
        typer.echo(str(result.chain_head))
        return
    if verify:
        result = home.registry.verify(expect=anchor)
        problems = list(result.problems)
        for v in home.registry.versions():
            problems += home.verify_files(v)
        if len(problems) == 1:
            console.print(f"[red]audit verification failed:[/] {escape(problems[0])}", soft_wrap=True)
            raise typer.Exit(1)
        for problem in problems[:20]:
            console.print(f"[red]broken:[/] {escape(problem)}", soft_wrap=True)
        if problems:
            more = f" ({len(problems) - 20} more not shown)" if len(problems) > 20 else ""
            console.print(f"[red]audit verification failed: {len(problems)} problem(s){more}[/]", soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"audit log verified: {result.entries} entries, {result.versions} versions and their files, {result.promotions} promotions", soft_wrap=True)
        if anchor is not None:
            console.print(f"reaches the expected head {anchor.short}", soft_wrap=True)
        console.print(f"chain head {result.chain_head}", soft_wrap=True)
        return
    entries = home.registry.audit(site=site, limit=limit)
    if as_json:
        print_json({"entries": [dataclasses.asdict(e) for e in entries], "chain_head": str(home.registry.chain_head())})
        return
    table = Table(title="audit log")
    for column in ("#", "at", "actor", "action", "site", "version", "sha256", "detail"):
        table.add_column(column)
    for e in entries:
        detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if k not in ("path", "files", "row") and v is not None)
        table.add_row(str(e.id), e.at[:19].replace("T", " "), e.actor, e.action, e.site or "", f"v{e.version}" if e.version else "", (e.sha256 or "")[:12], detail)
    console.print(table)
    console.print(f"chain head {home.registry.chain_head()} (keep it outside this machine; `--verify --expect` checks the log still reaches it)", soft_wrap=True)
