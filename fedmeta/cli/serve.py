"""``fedmeta serve``: the site's prediction server."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail, integrity_errors, port_in_use, user_errors
from fedmeta.cli.options import SITE_HOME_OPTION, open_home
from fedmeta.cli.output import console


def serve(
    site_home: Path = SITE_HOME_OPTION,
    site: str = typer.Option(None, "--site", help="Site to serve (default: the only site in the site home)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1 keeps it on this machine)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    max_rows: int = typer.Option(1024, "--max-rows", help="Rows per prediction request."),
    access_log: bool = typer.Option(False, "--access-log", help="Log one JSON line per request."),
) -> None:
    """Serve the site's promoted model: predictions, Open Inference Protocol v2, head requests, metrics."""
    from fedmeta.registry import AuditChainError
    from serving import ServingSettings, create_app
    from serving.app import configure_logging
    from serving.server import run

    home = open_home(site_home).path  # a typo must not start a server on a new, empty registry
    taken = port_in_use(host, port)
    if taken:
        raise fail(taken)
    configure_logging(access_log)
    try:
        app_ = create_app(ServingSettings(site_home=home, site=site, max_rows=max_rows))
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
