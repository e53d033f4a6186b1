"""The console script is installed and its commands work."""

import json
import subprocess
import sys

import pytest
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


def test_version_option_prints_the_installed_version():
    import fedmeta

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedmeta {fedmeta.__version__}"


def test_the_license_file_is_the_apache_2_text_pyproject_declares():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}


def _commands():
    import click
    import typer

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), command

    return list(walk(typer.main.get_command(app), []))


def test_every_command_and_every_option_has_help_text():
    missing = [f"{path} {param.name}" for path, command in _commands() for param in command.params if not getattr(param, "help", None)]
    missing += [f"{path} (no docstring)" for path, command in _commands() if not command.help]
    assert missing == []


def test_the_algorithm_option_is_a_choice():
    import click

    algorithm = next(p for path, command in _commands() if path == "demo" for p in command.params if p.name == "algorithm")
    assert isinstance(algorithm.type, click.Choice)
    assert [getattr(c, "value", c) for c in algorithm.type.choices] == ["reptile", "fomaml", "maml", "metasgd", "anil"]


@pytest.mark.slow
def test_scores_are_shown_beside_the_feature_blind_baseline_and_the_held_out_rows(tmp_path, hospitals, base_run, monkeypatch):
    from fedmeta.cli.output import console

    monkeypatch.setattr(console, "_width", 400)  # tables on one line each
    runner = CliRunner()
    home = ["--site-home", str(tmp_path)]
    personalized = runner.invoke(app, ["personalize", "--data", str(hospitals / "hospital_002.csv"), "--schema", str(hospitals / "schema.json"),
                                       "--base", str(base_run), *home])
    assert personalized.exit_code == 0, personalized.output
    header = next(line for line in personalized.output.splitlines() if "personalized" in line and "task" in line)
    assert header.split() == ["task", "metric", "baseline", "alone", "base", "personalized", "change", "rows"]
    mortality = next(line for line in personalized.output.splitlines() if line.split()[:2] == ["mortality", "acc"])
    assert len(mortality.split()) == 8  # a baseline value, the site's own model's score and the row count in their columns
    head = runner.invoke(app, ["heads", "add", "--task", "mortality", "--data", str(hospitals / "hospital_002.csv"), "--steps", "20", *home])
    assert head.exit_code == 0, head.output
    assert "baseline" in head.output and "rows" in head.output
    listing = runner.invoke(app, ["models", "list", *home])
    assert listing.exit_code == 0, listing.output
    for column in ("tasks", "held-out scores", "held-out rows"):
        assert column in listing.output
    v2 = next(line for line in listing.output.splitlines() if line.startswith("│ v2"))
    assert "mortality" in v2 and "length_of_stay" in v2 and "(baseline 0." in v2


def test_a_taken_port_is_refused_before_anything_is_printed_and_the_demo_reuses_its_key(tmp_path):
    import socket

    from fedmeta.cli.demo import _demo_key
    from fedmeta.cli.errors import port_in_use
    from fedmeta.registry import SiteHome

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "choose another --port" in port_in_use("127.0.0.1", port)
    assert port_in_use("127.0.0.1", port) is None  # free again once closed
    (tmp_path / "site-home").mkdir()
    home = SiteHome(tmp_path / "site-home")
    first, second = _demo_key(home), _demo_key(home)
    assert first == second and (tmp_path / "demo-key.txt").stat().st_mode & 0o777 == 0o600
    assert len(json.loads((tmp_path / "site-home" / "api_keys.json").read_text())["keys"]) == 1


# --- fedmeta serve and python -m serving: one set of options ----------------------------------------


def _help(*command: str) -> list[str]:
    import os

    out = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "100"})
    return out.stdout.splitlines()


def test_python_m_serving_prints_the_same_help_as_fedmeta_serve():
    serving, fedmeta_serve = _help("serving"), _help("fedmeta.cli", "serve")
    usage = next(i for i, line in enumerate(serving) if "Usage:" in line)
    assert serving[usage].split() == ["Usage:", "fedmeta", "serve", "[OPTIONS]"]
    assert serving[usage + 1:] == fedmeta_serve[usage + 1:] and "--set" in "\n".join(serving)


def test_serve_help_names_every_setting_without_sphinx_markup():
    from serving.settings import ServingSettings

    text = "\n".join(_help("fedmeta.cli", "serve"))
    assert not [mark for mark in (":mod:", ":class:", ":func:", ":meth:", ":data:", "``") if mark in text]
    assert [name for name in ServingSettings.model_fields if name not in ("site_home", "site") and f"{name} (default " not in text] == []


def test_serve_settings_come_from_set_and_max_rows(tmp_path):
    from fedmeta.cli.serve import parse_settings

    settings = parse_settings(tmp_path, None, 64, ["shutdown_grace=10", "docs=true"])
    assert (settings.max_rows, settings.shutdown_grace, settings.docs, settings.site_home) == (64, 10.0, True, tmp_path)
    assert parse_settings(tmp_path, None, 64, ["max_rows=8"]).max_rows == 8  # --set wins over the shorthand


@pytest.mark.parametrize("assignment, message", [
    ("shutdwn_grace=10", "--set shutdwn_grace: no such server setting; known: max_rows, max_body_bytes,"),
    ("max_body_bytes=12", "--set max_body_bytes=12: Input should be greater than or equal to 1024"),
    ("shutdown_grace", "--set 'shutdown_grace': expected NAME=VALUE, e.g. --set shutdown_grace=10"),
    ("site_home=/elsewhere", "--set site_home: use --site-home instead"),
])
def test_a_bad_set_is_one_line_naming_the_setting(tmp_path, assignment, message):
    from fedmeta.registry import SiteHome

    SiteHome(tmp_path).registry.record("test", "note")  # an existing site home: the settings are checked next
    result = CliRunner().invoke(app, ["serve", "--site-home", str(tmp_path), "--set", assignment])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: {message}"), result.output
