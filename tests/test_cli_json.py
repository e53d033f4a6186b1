"""``--json`` on ``models list``, ``models audit`` and ``keys list``, and the registry listing at terminal widths."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from site_server import SITE, publish_version

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory, hospitals, base_run):
    """A site home with a base (v1), a promoted personalized version (v2), one more (v3), and a key per role."""
    from fedmeta.registry import SiteHome
    from serving.auth import KeyStore

    site_home = SiteHome(tmp_path_factory.mktemp("cli-json") / "home")
    publish_version(site_home, hospitals, base_run, seed=1, promote=True)
    publish_version(site_home, hospitals, base_run, seed=2, promote=False)
    secrets = [KeyStore(site_home.path).create(f"{role}-app", role)[1] for role in ("predict", "department", "admin")]
    return site_home, secrets


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_models_list_json_is_one_document_with_full_hashes_and_the_promoted_version(home):
    site_home, _ = home
    document = json.loads(_invoke("models", "list", "--json", "--site-home", str(site_home.path)))
    versions = {v["version"]: v for v in document["versions"]}
    assert list(versions) == ["v1", "v2", "v3"]
    assert [v["promoted"] for v in versions.values()] == [False, True, False]
    assert versions["v2"]["sha256"] == site_home.registry.get(2).sha256 and versions["v2"]["parent"] == "v1"
    assert versions["v2"]["site"] == SITE and {"mortality", "length_of_stay"} <= set(versions["v2"]["tasks"])
    assert versions["v2"]["metrics"] == site_home.registry.get(2).metrics


def test_models_list_prints_one_block_per_version_on_a_narrow_terminal(home, monkeypatch):
    from fedmeta.cli.output import console

    site_home, _ = home
    monkeypatch.setattr(console, "_width", 80)
    lines = _invoke("models", "list", "--site-home", str(site_home.path)).splitlines()
    assert f"v2  personalized  {SITE}  promoted" in lines and f"v3  personalized  {SITE}" in lines
    scores = next(line for line in lines if line.startswith("  held-out scores: "))
    assert "mortality acc 0." in scores and "(baseline 0." in scores and "…" not in "\n".join(lines)  # every cell whole, none cut to "per…"
    assert f"  sha256: {site_home.registry.get(2).sha256[:12]}" in lines


def test_models_list_is_a_table_on_a_wide_terminal(home, monkeypatch):
    from fedmeta.cli.output import console

    site_home, _ = home
    monkeypatch.setattr(console, "_width", 200)
    output = _invoke("models", "list", "--site-home", str(site_home.path))
    assert any(line.startswith("│ v2") and "promoted" in line for line in output.splitlines())


def test_models_audit_json_lists_the_entries_and_the_chain_head(home):
    site_home, _ = home
    document = json.loads(_invoke("models", "audit", "--json", "--site-home", str(site_home.path)))
    actions = [e["action"] for e in document["entries"]]
    assert actions.count("register") == 3 and "promote" in actions
    assert document["chain_head"] == str(site_home.registry.chain_head())
    assert all(len(e["row_hash"]) == 64 for e in document["entries"])


def test_models_audit_json_refuses_verify_in_one_line(home):
    site_home, _ = home
    result = runner.invoke(app, ["models", "audit", "--json", "--verify", "--site-home", str(site_home.path)])
    assert result.exit_code == 2 and result.output.strip() == "error: --json lists the log: use it without --verify and --head"


def test_keys_list_json_names_every_key_and_shows_no_secret_or_hash(home):
    site_home, secrets = home
    output = _invoke("keys", "list", "--json", "--site-home", str(site_home.path))
    keys = json.loads(output)["keys"]
    assert [(k["name"], k["role"], k["revoked_at"]) for k in keys] == [("predict-app", "predict", None), ("department-app", "department", None), ("admin-app", "admin", None)]
    assert all("sha256" not in k for k in keys) and not any(secret in output for secret in secrets)
