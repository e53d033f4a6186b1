"""``fedmeta console``: the coordinator's web page over a folder of run folders (:mod:`fedmeta.console`)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail, port_in_use
from fedmeta.cli.output import console


def console_command(
    runs: Path = typer.Option(Path("runs"), "--runs", help="The folder of run folders to show (and launch new runs in)."),
    site_home: Path = typer.Option(None, "--site-home", envvar="FEDMETA_SITE_HOME", help="The folder whose api_keys.json holds the console's keys (default ./site-home)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1 keeps it on this machine)."),
    port: int = typer.Option(8090, "--port", min=1, max=65535, help="Port to listen on."),
) -> None:
    """Watch, launch and stop federated runs in a browser: runs, rounds, sites, privacy, events, base models.

    Keys: `fedmeta keys create --role viewer|coordinator --name NAME --site-home HOME`; a viewer reads, a
    coordinator also launches, stops and resumes runs. Stopping the console stops no run.
    """
    import uvicorn

    from fedmeta.cli.options import default_site_home
    from fedmeta.console.app import create_app
    from serving.auth import KeyStore

    home = site_home or default_site_home()
    if not home.is_dir():
        raise fail(f"no site home at {home}: the folder that holds the console's keys does not exist (check --site-home)")
    if not runs.is_dir():
        runs.mkdir(parents=True)
    taken = port_in_use(host, port)
    if taken:
        raise fail(taken)
    if not [k for k in KeyStore(home).keys() if not k.revoked_at and k.role in ("viewer", "coordinator")]:
        console.print(f"[yellow]no console keys yet: create one with `fedmeta keys create --role coordinator --name you --site-home {home}`[/]", highlight=False)
    console.print(f"fedmeta console over {runs.resolve()} on http://{host}:{port}", highlight=False)
    uvicorn.run(create_app(runs, home), host=host, port=port, log_level="warning")
