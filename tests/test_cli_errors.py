"""Every command answers a bad option and a bad file with one clear line and a non-zero exit: no traceback, no locals, no data."""

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app

runner = CliRunner()
QUICK = ("--mode", "head", "--shots", "10", "--steps", "5", "--no-alone")  # a promoted model in seconds: heads only, no fit of the site alone
SECRET = "PATIENT-SECRET-4711"
SECRET_NUMBER = "12345.678"


@pytest.fixture(scope="module")
def world(tmp_path_factory, hospitals, base_run):
    """A site home with one personalized model, files holding a patient's identifiers, and non-files."""
    root = tmp_path_factory.mktemp("cli-errors")
    home = root / "home"
    args = ["personalize", "--data", str(hospitals / "hospital_002.csv"), "--schema", str(hospitals / "schema.json"), "--base", str(base_run)]
    assert runner.invoke(app, args + ["--site-home", str(home), *QUICK]).exit_code == 0  # any promoted model does
    rows = pd.read_csv(hospitals / "hospital_002.csv")
    rows["age"] = rows["age"].astype(object)
    rows.loc[3, "age"] = SECRET  # a name typed into a numeric column
    rows.loc[4, "ward"] = SECRET_NUMBER  # and a number into a categorical one
    (root / "secret.csv").write_text(rows.to_csv(index=False))
    (root / "garbage.bin").write_bytes(b"\x89PNG\x00\xff" + SECRET.encode() * 20)
    (root / "garbage.txt").write_text(f"{SECRET},{SECRET_NUMBER}\n" * 5)
    (root / "garbage-home").mkdir()
    (root / "garbage-home" / "registry.sqlite").write_text(f"{SECRET} not a database\n" * 50)
    (root / "garbage-report").mkdir()
    (root / "garbage-report" / "results.json").write_text("{" + SECRET)
    return {"root": root, "home": home, "hospitals": hospitals, "base": base_run}


def _cases(w):
    root, home, hospitals, base = w["root"], str(w["home"]), w["hospitals"], str(w["base"])
    secret, binary, text, missing = str(root / "secret.csv"), str(root / "garbage.bin"), str(root / "garbage.txt"), str(root / "no-such-home")
    schema, site_rows = str(hospitals / "schema.json"), str(hospitals / "hospital_002.csv")
    personalize = ["personalize", "--schema", schema, "--base", base, "--site-home", home]
    return {
        "train bad option": ["train", "--rounds", "many"],
        "train bad file": ["train", "--config", text],
        "train missing file": ["train", "--config", str(root / "missing.toml")],
        "personalize --test-fraction 0": personalize + ["--data", site_rows, "--test-fraction", "0"],
        "personalize --test-fraction 1": personalize + ["--data", site_rows, "--test-fraction", "1"],
        "personalize bad option": personalize + ["--data", site_rows, "--mode", "everything"],
        "personalize bad data": personalize + ["--data", secret],
        "personalize garbage data": personalize + ["--data", binary],
        "personalize data as schema": ["personalize", "--data", secret, "--schema", secret, "--base", base, "--site-home", home],
        "personalize garbage base": ["personalize", "--data", secret, "--schema", schema, "--base", binary, "--site-home", home],
        "heads add bad option": ["heads", "add", "--task", "mortality", "--data", secret, "--steps", "many", "--site-home", home],
        "heads add bad data": ["heads", "add", "--task", "mortality", "--data", secret, "--site-home", home],
        "heads add garbage data": ["heads", "add", "--task", "mortality", "--data", binary, "--site-home", home],
        "models list bad option": ["models", "list", "--kind", "everything", "--site-home", home],
        "models list garbage registry": ["models", "list", "--site-home", str(root / "garbage-home")],
        "models show bad version": ["models", "show", "vX", "--site-home", home],
        "models show garbage registry": ["models", "show", "v1", "--site-home", str(root / "garbage-home")],
        "models promote a base": ["models", "promote", "v1", "--site-home", home],
        "models promote bad registry": ["models", "promote", "v2", "--site-home", str(root / "garbage-home")],
        "models rollback nothing before": ["models", "rollback", "--site-home", home],
        "models rollback bad registry": ["models", "rollback", "--site-home", str(root / "garbage-home")],
        "models audit bad option": ["models", "audit", "--limit", "0", "--site-home", home],
        "models audit bad registry": ["models", "audit", "--verify", "--site-home", str(root / "garbage-home")],
        "keys create bad option": ["keys", "create", "--role", "root", "--name", "x", "--site-home", home],
        "keys create missing home": ["keys", "create", "--role", "predict", "--name", "x", "--site-home", missing],
        "keys list missing home": ["keys", "list", "--site-home", missing],
        "keys revoke bad id": ["keys", "revoke", "no-such-key", "--site-home", home],
        "serve bad option": ["serve", "--port", "eighty", "--site-home", home],
        "serve garbage registry": ["serve", "--site-home", str(root / "garbage-home")],
        "certs ca onto a file": ["certs", "ca", "--out", text],
        "certs server bad ca": ["certs", "server", "fl.example.org", "--ca", missing, "--out", str(root / "tls")],
        "certs site bad name": ["certs", "site", "../escape", "--out", str(root / "keys")],
        "synth bad option": ["synth", "hospitals", str(root / "synth"), "--sites", "0"],
        "synth onto a file": ["synth", "hospitals", text],
        "synth fraud onto a file": ["synth", "fraud", text, "--banks", "2"],
        "evaluate bad option": ["evaluate", "--algorithms", "fedsgd", "--out", str(root / "ev")],
        "evaluate onto a file": ["evaluate", "--out", text, "--sites", "3", "--rounds", "1"],
        "demo bad option": ["demo", "--algorithm", "fedsgd", "--out", str(root / "demo")],
        "demo onto a file": ["demo", "--quick", "--out", text],
        "report missing folder": ["report", missing],
        "report garbage results": ["report", str(root / "garbage-report")],
        "predict bad option": ["predict", "--data", secret, "--site-home", home, "--site", "no-such-site"],
        "predict bad data": ["predict", "--data", secret, "--site-home", home],
        "predict garbage data": ["predict", "--data", binary, "--site-home", home],
        "predict missing data": ["predict", "--data", str(root / "missing.csv"), "--site-home", home],
        "version bad option": ["version", "--verbose"],
        "unknown command": ["fly"],
    }


CASES = list(_cases({"root": Path("/"), "home": "/", "hospitals": Path("/"), "base": "/"}))  # the names only


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_without_traceback_locals_or_data(world, case):
    result = runner.invoke(app, _cases(world)[case])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    assert 1 <= len(lines) <= 3, result.output
    assert "error" in result.output.lower() or "refus" in result.output.lower(), result.output
    assert "Traceback" not in result.output and "locals" not in result.output
    assert SECRET not in result.output and SECRET_NUMBER not in result.output, result.output


def test_a_data_error_names_the_file_column_and_row(world):
    result = runner.invoke(app, _cases(world)["personalize bad data"])
    assert result.exit_code == 2
    assert "secret.csv: column 'age' row 5: expected a number" in " ".join(result.output.split())


def test_test_fraction_zero_names_the_option(world):
    result = runner.invoke(app, _cases(world)["personalize --test-fraction 0"])
    assert result.exit_code == 2 and "--test-fraction must be between 0 and 1" in result.output


def test_a_missing_site_home_is_refused_and_never_created(world, tmp_path):
    typo = tmp_path / "site-hmoe"
    for args in (["models", "list"], ["models", "show", "v1"], ["models", "promote", "v2"], ["models", "rollback"], ["models", "audit"],
                 ["heads", "add", "--task", "mortality", "--data", str(world["root"] / "secret.csv")], ["serve"], ["keys", "list"],
                 ["keys", "create", "--role", "predict", "--name", "app"], ["keys", "revoke", "k1"], ["predict", "--data", str(world["root"] / "secret.csv")]):
        result = runner.invoke(app, args + ["--site-home", str(typo)])
        assert result.exit_code == 2, (args, result.output)
        assert f"no site home at {typo}" in " ".join(result.output.split()), (args, result.output)
        assert not typo.exists(), args


def test_an_unexpected_error_is_one_redacted_line_and_a_hint(world, monkeypatch):
    from fedmeta.registry import SiteHome

    def broken(*_args, **_kwargs):
        raise RuntimeError(f"row {SECRET_NUMBER} of ['{SECRET}', 71]: boom")

    monkeypatch.setattr(SiteHome, "existing", classmethod(broken))
    result = runner.invoke(app, ["models", "list", "--site-home", str(world["home"])])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["internal error: RuntimeError: row … of […]: boom (rerun with FEDMETA_DEBUG=1 for a traceback)"]
    monkeypatch.setenv("FEDMETA_DEBUG", "1")
    debug = runner.invoke(app, ["models", "list", "--site-home", str(world["home"])])
    assert debug.exit_code == 1 and "Traceback" in debug.output and "locals" not in debug.output


def test_the_app_never_shows_locals_in_a_traceback():
    assert app.pretty_exceptions_show_locals is False


def test_an_error_naming_several_files_prints_one_error_line_per_file(capsys):
    from fedmeta.cli.errors import fail
    from fedmeta.data.schema import SchemaProblems

    fail(SchemaProblems(["a/test.csv has no column 'y' (label of task 't')", "b/train.csv: missing feature column(s) ['age']"]))
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == ["error: a/test.csv has no column 'y' (label of task 't')", "error: b/train.csv: missing feature column(s) ['age']"]


def test_an_error_is_reported_without_importing_layers_the_command_never_used(tmp_path):
    # Reporting a registry error must not import the personalize layer (torch, onnx) to see whether it was one of its errors.
    import subprocess
    import sys

    code = ("import sys\nfrom fedmeta.cli import app\n"
            f"try:\n    app(['models', 'list', '--site-home', {str(tmp_path / 'nowhere')!r}])\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'torch' in sys.modules, 'fedmeta.personalize' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "no site home at" in result.stdout and result.stdout.strip().splitlines()[-1] == "2 False False", result.stdout + result.stderr
