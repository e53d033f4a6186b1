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
