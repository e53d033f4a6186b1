"""``fedmeta keys``: API keys of the site's prediction server (stored hashed)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail
from fedmeta.cli.options import SITE_HOME_OPTION, default_site_home
from fedmeta.cli.output import console, print_json

app = typer.Typer(help="API keys of the site's prediction server (stored hashed).", no_args_is_help=True)


@app.command("create")
def keys_create(
    role: str = typer.Option(..., "--role", help="What the key may do on the site server: predict; department (also head requests); or admin. On the coordinator console: viewer; or coordinator (also launches and stops runs)."),
    name: str = typer.Option(..., "--name", help="Who or what uses the key (shown in the audit log)."),
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """Create an API key; its secret is printed once and only its hash is stored."""
    from serving.auth import KeyManagementError, KeyStore

    try:
        key, secret = KeyStore(_key_folder(site_home)).create(name, role)
    except KeyManagementError as e:
        raise fail(e) from None
    console.print(f"key {key.id} ({key.role}) for {key.name}; keep this secret, it is not shown again:")
    typer.echo(secret)


@app.command("list")
def keys_list(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on standard output instead of a table."),
    site_home: Path = SITE_HOME_OPTION,
) -> None:
    """List keys (ids, names, roles; never secrets)."""
    from rich.table import Table

    from serving.auth import KeyManagementError, KeyStore

    try:
        keys = KeyStore(_key_folder(site_home)).keys()
    except KeyManagementError as e:
        raise fail(e) from None
    if as_json:  # never the stored hash either: it is the secret's stand-in
        print_json({"keys": [{"id": k.id, "name": k.name, "role": k.role, "created_at": k.created_at, "revoked_at": k.revoked_at} for k in keys]})
        return
    table = Table(title="API keys")
    for column in ("id", "name", "role", "created", "revoked"):
        table.add_column(column)
    for k in keys:
        table.add_row(k.id, k.name, k.role, k.created_at, k.revoked_at or "")
    console.print(table)


@app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (from `fedmeta keys list`)."), site_home: Path = SITE_HOME_OPTION) -> None:
    """Revoke a key; a running server stops accepting it within a second."""
    from serving.auth import KeyManagementError, KeyStore

    try:
        key = KeyStore(_key_folder(site_home)).revoke(key_id)
    except KeyManagementError as e:
        raise fail(e) from None
    console.print(f"revoked key {key.id} ({key.name}, {key.role})")


def _key_folder(site_home: Path | None) -> Path:
    """The site home holding api_keys.json: it may have no models yet, but a mistyped folder is refused, never created."""
    from fedmeta.registry import RegistryError

    folder = site_home or default_site_home()
    if not folder.is_dir():
        raise RegistryError(f"no site home at {folder}: the folder does not exist (check --site-home or $FEDMETA_SITE_HOME)")
    return folder
