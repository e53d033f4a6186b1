"""The console script is installed and its commands work."""

import subprocess
import sys

from typer.testing import CliRunner

from fedmeta.cli import app


def test_console_script_prints_help():
    out = subprocess.run([sys.executable, "-m", "fedmeta.cli", "--help"], capture_output=True, text=True, check=True)
    assert "federated meta-learning" in out.stdout


def test_synth_hospitals_writes_site_files_and_schema(tmp_path):
    result = CliRunner().invoke(app, ["synth", "hospitals", str(tmp_path), "--sites", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital_000.csv", "hospital_001.csv", "hospital_002.csv", "schema.json"]


def test_certs_make_a_ca_a_server_certificate_it_signed_and_site_keys_flower_can_read(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    runner = CliRunner()
    ca, tls, keys = tmp_path / "ca", tmp_path / "tls", tmp_path / "keys"
    assert runner.invoke(app, ["certs", "ca", "--out", str(ca)]).exit_code == 0
    assert runner.invoke(app, ["certs", "server", "fl.example.org", "10.0.0.5", "--ca", str(ca), "--out", str(tls)]).exit_code == 0
    assert runner.invoke(app, ["certs", "site", "st-marys", "--out", str(keys)]).exit_code == 0
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca_cert)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org"] and [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    # The formats flower-supernode and `flwr supernode register` load.
    serialization.load_ssh_private_key((keys / "st-marys.key").read_bytes(), None)
    serialization.load_ssh_public_key((keys / "st-marys.pub").read_bytes())
    for private in (ca / "ca.key", tls / "server.key", keys / "st-marys.key"):
        assert private.stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["certs", "site", "st-marys", "--out", str(keys)])
    # rich folds long lines, at spaces or inside a long path
    assert again.exit_code == 1 and "refusing to overwrite" in " ".join(again.output.split())
    assert "st-marys.key" in again.output.replace("\n", "")
