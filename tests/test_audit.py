"""The audit log is a hash chain; versions and promotions cannot be rewritten, and a rewrite behind fedmeta's back is detected."""

import sqlite3

import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.manifest import Manifest
from fedmeta.registry import SiteHome

runner = CliRunner()

TRIGGERS = [
    "audit_append_only_update", "audit_append_only_delete", "audit_no_overwrite",
    "promotions_append_only_update", "promotions_append_only_delete", "promotions_no_overwrite",
    "versions_immutable_update", "versions_immutable_delete", "versions_no_overwrite",
]


def _history(tmp_path) -> SiteHome:
    """Three versions of one site, promoted in turn and rolled back once."""
    home = SiteHome(tmp_path)
    for payload in (b"one", b"two", b"three"):
        manifest = Manifest(kind="personalized", site="st-marys", model_file="model.onnx", sha256="", files={})
        version, _ = home.store({"model.onnx": payload, "state.pt": b"w" + payload}, manifest, actor="ana")
        home.registry.promote("st-marys", version.version, actor="ana")
    home.registry.rollback("st-marys", actor="bo")
    return home


def _attacker(tmp_path) -> sqlite3.Connection:
    """Someone with write access to the file, who first drops fedmeta's triggers."""
    con = sqlite3.connect(tmp_path / "registry.sqlite", isolation_level=None)
    for trigger in TRIGGERS:
        con.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    return con


def _verify(tmp_path):
    return runner.invoke(app, ["models", "audit", "--verify", "--site-home", str(tmp_path)])


def test_an_untouched_log_verifies_and_prints_its_chain_head(tmp_path):
    home = _history(tmp_path)
    result = home.registry.verify()
    assert result.ok and result.entries == 7 and result.versions == 3 and result.promotions == 4
    cli = _verify(tmp_path)
    assert cli.exit_code == 0, cli.output
    assert f"chain head {result.head}" in cli.output
    shown = runner.invoke(app, ["models", "audit", "--site-home", str(tmp_path)])
    assert shown.exit_code == 0 and result.head in shown.output


def test_each_audit_row_carries_the_hash_of_the_one_before(tmp_path):
    _history(tmp_path)
    con = sqlite3.connect(tmp_path / "registry.sqlite")
    rows = con.execute("SELECT prev_hash, row_hash FROM audit ORDER BY id").fetchall()
    assert rows[0][0] == "0" * 64
    assert all(later[0] == earlier[1] for earlier, later in zip(rows, rows[1:]))
    assert len({r[1] for r in rows}) == len(rows)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT OR REPLACE INTO audit (id, at, actor, action, detail) VALUES (2, 'now', 'mallory', 'promote', '{}')",
        "REPLACE INTO audit (id, at, actor, action, detail) VALUES (2, 'now', 'mallory', 'promote', '{}')",
        "INSERT OR REPLACE INTO promotions (id, site, version, previous, at, actor) VALUES (1, 'st-marys', 3, NULL, 'now', 'mallory')",
        "REPLACE INTO promotions (id, site, version, previous, at, actor) VALUES (1, 'st-marys', 3, NULL, 'now', 'mallory')",
        "REPLACE INTO versions (version, kind, site, path, sha256, created_at, created_by, metrics, lineage) "
        "VALUES (1, 'personalized', 'st-marys', 'models/evil', 'ff', 'now', 'mallory', '{}', '{}')",
        # a new id but an existing hash: REPLACE would silently delete version 1 to make room
        "INSERT OR REPLACE INTO versions (version, kind, site, path, sha256, created_at, created_by, metrics, lineage) "
        "SELECT 99, kind, site, 'models/evil', sha256, created_at, created_by, metrics, lineage FROM versions WHERE version = 1",
        "UPDATE versions SET path = 'models/evil' WHERE version = 1",
        "UPDATE versions SET sha256 = 'ff' WHERE version = 2",
        "DELETE FROM versions WHERE version = 3",
    ],
    ids=["audit-insert-or-replace", "audit-replace-into", "promotions-insert-or-replace", "promotions-replace-into",
         "versions-replace-into", "versions-replace-by-hash", "versions-update-path", "versions-update-sha", "versions-delete"],
)
def test_rewriting_history_through_sql_is_refused(tmp_path, statement):
    home = _history(tmp_path)
    before = home.registry.verify()
    con = sqlite3.connect(tmp_path / "registry.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only|immutable"):
        con.execute(statement)
    con.close()
    after = home.registry.verify()
    assert after.ok and after.head == before.head


def test_a_rewritten_audit_entry_fails_verify_naming_the_entry(tmp_path):
    _history(tmp_path)
    _attacker(tmp_path).execute("UPDATE audit SET actor = 'mallory' WHERE id = 5")
    cli = _verify(tmp_path)
    assert cli.exit_code == 1
    assert "audit entry #5 (register v3) was rewritten" in cli.output


def test_a_deleted_audit_entry_breaks_the_chain(tmp_path):
    _history(tmp_path)
    _attacker(tmp_path).execute("DELETE FROM audit WHERE id = 3")
    cli = _verify(tmp_path)
    assert cli.exit_code == 1
    assert "audit entry #4 (promote v2): the chain breaks before it" in " ".join(cli.output.split())
    assert "version v2 has no register entry" in " ".join(cli.output.split())


def test_a_rewritten_version_hash_and_path_fail_verify(tmp_path):
    home = _history(tmp_path)
    con = _attacker(tmp_path)
    # point v2 at v3's folder and hash, as if to serve other bytes under v2's name
    v3 = home.registry.get(3)
    con.execute("UPDATE versions SET sha256 = ?, path = ? WHERE version = 2", ("ab" * 32, v3.path))
    cli = _verify(tmp_path)
    assert cli.exit_code == 1
    assert "version v2 differs from its register entry #3" in " ".join(cli.output.split())


def test_a_rewritten_version_metric_fails_verify(tmp_path):
    _history(tmp_path)
    _attacker(tmp_path).execute("UPDATE versions SET metrics = '{\"mortality.personalized.acc\": 0.99}' WHERE version = 1")
    cli = _verify(tmp_path)
    assert cli.exit_code == 1 and "version v1 was rewritten after registration" in " ".join(cli.output.split())


def test_a_forged_promotion_fails_verify(tmp_path):
    home = _history(tmp_path)
    _attacker(tmp_path).execute(
        "INSERT INTO promotions (site, version, previous, at, actor) VALUES ('st-marys', 3, 4, '2026-01-01T00:00:00+00:00', 'mallory')"
    )
    assert home.registry.current("st-marys").version == 3  # the forgery would take effect...
    cli = _verify(tmp_path)
    assert cli.exit_code == 1  # ...but it is detected
    assert "promotion #5 (site 'st-marys', v3) has no audit entry" in " ".join(cli.output.split())


def test_a_rewritten_promotion_fails_verify(tmp_path):
    _history(tmp_path)
    _attacker(tmp_path).execute("UPDATE promotions SET version = 3 WHERE id = 4")
    cli = _verify(tmp_path)
    assert cli.exit_code == 1 and "promotion #4 (site 'st-marys', v3) was rewritten" in " ".join(cli.output.split())


def test_verify_also_checks_every_file_against_the_registry(tmp_path):
    home = _history(tmp_path)
    (home.folder(home.registry.get(1)) / "state.pt").write_bytes(b"other weights")
    cli = _verify(tmp_path)
    assert cli.exit_code == 1 and "state.pt does not match the hash the registry recorded for v1" in " ".join(cli.output.split())


LEGACY_SCHEMA = """
CREATE TABLE versions (version INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, site TEXT, path TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    parent INTEGER, created_at TEXT NOT NULL, created_by TEXT NOT NULL, metrics TEXT NOT NULL, lineage TEXT NOT NULL);
CREATE TABLE promotions (id INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, version INTEGER NOT NULL, previous INTEGER, at TEXT NOT NULL, actor TEXT NOT NULL);
CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, site TEXT, version INTEGER,
    sha256 TEXT, detail TEXT NOT NULL);
"""


def test_a_registry_from_before_the_chain_is_migrated_and_its_legacy_versions_decided(tmp_path):
    from fedmeta.manifest import ManifestError, sha256_bytes, write_version

    manifest = Manifest(kind="personalized", site="st-marys", model_file="model.onnx", sha256="", files={})
    write_version(tmp_path / "models" / "old", {"model.onnx": b"old model", "state.pt": b"old weights"}, manifest)
    sha = sha256_bytes(b"old model")
    con = sqlite3.connect(tmp_path / "registry.sqlite")
    con.executescript(LEGACY_SCHEMA)
    con.execute("INSERT INTO versions VALUES (1, 'personalized', 'st-marys', 'models/old', ?, NULL, 't', 'ana', '{}', '{}')", (sha,))
    con.execute("INSERT INTO promotions VALUES (1, 'st-marys', 1, NULL, 't', 'ana')")
    con.execute("INSERT INTO audit VALUES (1, 't', 'ana', 'register', 'st-marys', 1, ?, ?)", (sha, '{"kind": "personalized", "parent": null, "path": "models/old"}'))
    con.execute("INSERT INTO audit VALUES (2, 't', 'ana', 'promote', 'st-marys', 1, ?, '{\"from\": null}')", (sha,))
    con.commit()
    con.close()

    home = SiteHome(tmp_path)  # migrates
    legacy = home.registry.get(1)
    assert legacy.files is None
    assert home.load(legacy)[1] == b"old model"  # checked against the hash the registry did record
    with pytest.raises(ManifestError, match="before the registry recorded a hash per file"):
        home.load(legacy, "state.pt")
    (tmp_path / "models" / "old" / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(ManifestError, match="model.onnx does not match the hash the registry recorded"):
        home.load(legacy)
    (tmp_path / "models" / "old" / "model.onnx").write_bytes(b"old model")

    new, _ = home.store({"model.onnx": b"new", "state.pt": b"new weights"}, manifest, parent=1, actor="bo")
    home.registry.promote("st-marys", new.version, actor="bo")
    result = home.registry.verify()
    assert result.ok, result.problems
    assert result.entries == 4 and result.promotions == 2
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        sqlite3.connect(tmp_path / "registry.sqlite").execute("UPDATE versions SET path = 'x' WHERE version = 1")
