"""``fedmeta certs``: TLS and site credentials for a federation on Flower's Deployment Engine."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmeta.cli.errors import fail
from fedmeta.cli.output import console

app = typer.Typer(help="TLS and site credentials for a federation on Flower's Deployment Engine.", no_args_is_help=True)


def _certs(action):
    from fedmeta.fl.certs import CertificateError

    try:
        return action()
    except CertificateError as e:
        raise fail(e, 1) from None


@app.command("ca")
def certs_ca(folder: Path = typer.Option(Path("federation-ca"), "--out", help="Where to write ca.crt and ca.key.")) -> None:
    """Create the federation's certificate authority. Keep ca.key offline; give ca.crt to every site."""
    from fedmeta.fl.certs import create_ca

    ca = _certs(lambda: create_ca(folder))
    console.print(f"CA certificate: {ca.certificate}\nCA key (keep it offline): {ca.key}")


@app.command("server")
def certs_server(
    hosts: list[str] = typer.Argument(..., help="Every name or address sites use to reach the SuperLink, e.g. fl.example.org 10.0.0.5."),
    ca_folder: Path = typer.Option(Path("federation-ca"), "--ca", help="The folder with ca.crt and ca.key."),
    folder: Path = typer.Option(Path("superlink-tls"), "--out", help="Where to write server.pem and server.key."),
) -> None:
    """Sign the SuperLink's TLS certificate with the federation CA."""
    from fedmeta.fl.certs import CA, create_server_certificate

    cert, key = _certs(lambda: create_server_certificate(CA(ca_folder / "ca.crt", ca_folder / "ca.key"), folder, hosts))
    console.print(f"certificate: {cert}\nkey: {key}")
    console.print(
        f"start the SuperLink with: flower-superlink --ssl-ca-certfile {ca_folder / 'ca.crt'} --ssl-certfile {cert} "
        f"--ssl-keyfile {key} --enable-supernode-auth --database superlink-state.db --host 127.0.0.1 --port 8000 "
        "--disable-runtime-dependency-installation\n(on 127.0.0.1 only: sites reach it through the gateway, docs/deployment.md)"
    )


@app.command("site")
def certs_site(
    site: str = typer.Argument(..., help="The site's name, e.g. st-marys."),
    folder: Path = typer.Option(Path("site-keys"), "--out", help="Where to write <site>.key and <site>.pub."),
) -> None:
    """Create a site's SuperNode key pair: the private key stays at the site, the coordinator registers the public key."""
    from fedmeta.fl.certs import create_site_key

    private, public = _certs(lambda: create_site_key(folder, site))
    console.print(f"private key (stays at the site): {private}\npublic key (send to the coordinator): {public}")
    console.print(f"coordinator: flwr supernode register {public} <connection> --name {site}")
    console.print(f"site: flower-supernode --root-certificates ca.crt --auth-supernode-private-key {private} --superlink <coordinator>:<port> ...")
