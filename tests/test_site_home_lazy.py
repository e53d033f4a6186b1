"""A site home comes into being with its first stored version: a `fedmeta personalize` that fails before publishing leaves nothing.

Issue 25: a failed ``personalize`` left an empty ``registry.sqlite`` behind.
"""

from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.registry import SiteHome

runner = CliRunner()


def _personalize(home, hospitals, base_run, *extra, data=None):
    args = ["personalize", "--data", str(data or hospitals / "hospital_002.csv"), "--schema", str(hospitals / "schema.json"),
            "--base", str(base_run), "--site-home", str(home), *extra]
    return runner.invoke(app, args)


def test_a_missing_data_file_creates_no_site_home(tmp_path, hospitals, base_run):
    home = tmp_path / "site-home"
    result = _personalize(home, hospitals, base_run, data=tmp_path / "missing.csv")
    assert result.exit_code == 2 and "missing.csv" in result.output, result.output
    assert not home.exists()


def test_more_shots_than_rows_leaves_an_existing_empty_folder_empty(tmp_path, hospitals, base_run):
    home = tmp_path / "site-home"
    home.mkdir()
    result = _personalize(home, hospitals, base_run, "--shots", "100000", "--mode", "all")
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert list(home.iterdir()) == []


def test_reads_of_a_home_not_yet_written_see_an_empty_registry_and_create_nothing(tmp_path):
    home = SiteHome(tmp_path / "site-home")
    assert home.registry.versions() == [] and home.registry.sites() == [] and home.registry.verify().ok
    assert not home.path.exists()
