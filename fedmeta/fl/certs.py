"""Credentials for a federation on the Deployment Engine: a CA, the SuperLink's TLS certificate, site keys.

- :func:`create_ca` makes the federation's certificate authority (ECDSA
  P-384, ``ca.crt`` + ``ca.key``). The coordinator keeps ``ca.key`` offline;
  every site and operator gets ``ca.crt``.
- :func:`create_server_certificate` signs the SuperLink's certificate for
  the names and addresses sites use to reach it (``server.pem`` +
  ``server.key``); clients check the name, so list every one.
- :func:`create_site_key` makes a site's SuperNode key pair: the private key
  in OpenSSH format stays at the site (``--auth-supernode-private-key``),
  the public key is registered at the coordinator with
  ``flwr supernode register``. A SuperNode whose key is not registered is
  refused.

Private keys are written with mode 0600, every file atomically; nothing is
overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmeta.files import atomic_write_bytes


class CertificateError(RuntimeError):
    """Credentials that cannot be created or read."""


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    if path.exists():
        raise CertificateError(f"{path} already exists; refusing to overwrite credentials (remove it first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, private)
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CA:
    certificate: Path
    key: Path


def create_ca(folder: str | Path, name: str = "fedmeta federation CA", days: int = 3650) -> CA:
    """A self-signed certificate authority in ``folder`` (``ca.crt``, ``ca.key``)."""
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path = _write(folder / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True)
    cert_path = _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return CA(cert_path, key_path)


def _load_ca(ca: CA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.certificate.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise CertificateError(f"cannot read the CA ({ca.certificate}, {ca.key}): {e}") from None
    return cert, key


def create_server_certificate(ca: CA, folder: str | Path, hosts: list[str], days: int = 825) -> tuple[Path, Path]:
    """The SuperLink's certificate for ``hosts`` (DNS names or IP addresses), signed by ``ca``."""
    if not hosts:
        raise CertificateError("give at least one host name or address the sites will connect to (e.g. 127.0.0.1)")
    ca_cert, ca_key = _load_ca(ca)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = Path(folder)
    key_path = _write(folder / "server.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True)
    cert_path = _write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def create_site_key(folder: str | Path, site: str) -> tuple[Path, Path]:
    """A SuperNode key pair for ``site``: ``<site>.key`` (OpenSSH private) and ``<site>.pub`` (OpenSSH public)."""
    if not site or any(c in site for c in "/\\ "):
        raise CertificateError(f"site name {site!r} must be non-empty, without spaces or slashes")
    key = ec.generate_private_key(ec.SECP384R1())
    folder = Path(folder)
    private = _write(folder / f"{site}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    public = _write(folder / f"{site}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
    return private, public
