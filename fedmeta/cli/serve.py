"""``fedmeta serve`` (also ``python -m serving``): the site's prediction server, one set of options."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail, integrity_errors, port_in_use, user_errors
from fedmeta.cli.options import SITE_HOME_OPTION, open_home
from fedmeta.cli.output import console
from serving.settings import ServingSettings

# Settings only their own options set (--max-rows is a shorthand: --set max_rows=N also works, and wins).
_OWN_OPTIONS = {"site_home": "--site-home", "site": "--site"}


def _settings_help() -> str:
    """Every server setting ``--set`` takes, with its default and meaning (from :class:`serving.settings.ServingSettings`)."""
    lines = [
        f"{name} (default {field.default}): {field.description}"
        for name, field in ServingSettings.model_fields.items() if name not in _OWN_OPTIONS
    ]
    return "Server settings for --set NAME=VALUE:\n\n" + "\n\n".join(lines)


def parse_settings(site_home: Path, site: str | None, max_rows: int, assignments: list[str]) -> ServingSettings:
    """The server's settings from the command's options; a bad ``--set`` is a one-line usage error naming it."""
    from pydantic import ValidationError

    values: dict = {"site_home": site_home, "site": site, "max_rows": max_rows}
    for item in assignments:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise fail(f"--set {item!r}: expected NAME=VALUE, e.g. --set shutdown_grace=10")
        if name in _OWN_OPTIONS:
            raise fail(f"--set {name}: use {_OWN_OPTIONS[name]} instead")
        if name not in ServingSettings.model_fields:
            known = ", ".join(n for n in ServingSettings.model_fields if n not in _OWN_OPTIONS)
            raise fail(f"--set {name}: no such server setting; known: {known}")
        values[name] = value
    try:
        return ServingSettings(**values)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise fail(f"--set {where}={values.get(where)!s}: {error['msg']}") from None


def serve(
    site_home: Path = SITE_HOME_OPTION,
    site: str = typer.Option(None, "--site", help="Site to serve (default: the only site in the site home)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1 keeps it on this machine)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    max_rows: int = typer.Option(1024, "--max-rows", min=1, help="Rows per prediction request."),
    access_log: bool = typer.Option(False, "--access-log", help="Log one JSON line per request."),
    assignments: list[str] = typer.Option(
        [], "--set", metavar="NAME=VALUE", help="Any server setting (repeatable), e.g. --set shutdown_grace=10; listed below."
    ),
) -> None:
    """Serve the site's promoted model: predictions, Open Inference Protocol v2, head requests, metrics.

    One uvicorn worker with a connection guard and JSON logs; on SIGTERM it
    answers the requests already received, for up to shutdown_grace seconds.
    `python -m serving` takes the same options.
    """
    from fedmeta.registry import AuditChainError
    from serving import create_app
    from serving.app import configure_logging
    from serving.server import run

    home = open_home(site_home).path  # a typo must not start a server on a new, empty registry
    settings = parse_settings(home, site, max_rows, assignments)
    taken = port_in_use(host, port)
    if taken:
        raise fail(taken)
    configure_logging(access_log)
    try:
        app_ = create_app(settings)
    except AuditChainError as e:
        raise fail(f"refusing to start: {e}") from None
    except user_errors() as e:
        raise fail(e) from None
    except integrity_errors() as e:
        raise fail(f"refusing to start: {e}", 1) from None
    from serving.auth import KeyStore

    if not [k for k in KeyStore(home).keys() if not k.revoked_at]:
        console.print("[yellow]no API keys yet: every request will get 401. Create one with `fedmeta keys create --role predict --name APP`.[/]")
    current = app_.state.fedmeta.store.current
    console.print(f"serving {current.site} {current.label} (sha256 {current.version.sha256[:16]}...) on http://{host}:{port}")
    run(app_, host, port)  # the connection guard, JSON logs and a bounded drain on SIGTERM (serving.server)


EPILOG = _settings_help()  # shown under the options by --help: every setting, from the settings model itself
