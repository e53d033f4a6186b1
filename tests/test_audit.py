"""The audit log is a hash chain; versions and promotions cannot be rewritten, and a rewrite behind fedmeta's back is detected."""

import hashlib
import json
import socket
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


def _verify(tmp_path, *expect: str):
    return runner.invoke(app, ["models", "audit", "--verify", *(["--expect", *expect] if expect else []), "--site-home", str(tmp_path)])


def _head(tmp_path) -> str:
    result = runner.invoke(app, ["models", "audit", "--head", "--site-home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def _one_line(output: str) -> str:
    return " ".join(output.split())


def _rechain(con: sqlite3.Connection) -> None:
    """What an attacker who knows the hashing rule does after a rewrite: recompute every hash, so the chain is consistent again."""
    con.row_factory = sqlite3.Row
    head = "0" * 64
    for row in con.execute("SELECT * FROM audit ORDER BY id").fetchall():
        fields = {k: row[k] for k in ("id", "at", "actor", "action", "site", "version", "sha256", "detail")}
        row_hash = hashlib.sha256((head + json.dumps(fields, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()
        con.execute("UPDATE audit SET prev_hash = ?, row_hash = ? WHERE id = ?", (head, row_hash, row["id"]))
        head = row_hash


def test_an_untouched_log_verifies_and_prints_its_chain_head(tmp_path):
    home = _history(tmp_path)
    result = home.registry.verify()
    assert result.ok and result.entries == 7 and result.versions == 3 and result.promotions == 4
    cli = _verify(tmp_path)
    assert cli.exit_code == 0, cli.output
    assert f"chain head {result.chain_head}" in cli.output
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


def _swap_served_model(home: SiteHome, con: sqlite3.Connection) -> None:
    """Replace the promoted v2's model bytes and rewrite its version row and audit entries to match, as one consistent forgery."""
    v2 = home.registry.get(2)
    evil = b"evil model"
    sha = hashlib.sha256(evil).hexdigest()
    (home.folder(v2) / "model.onnx").write_bytes(evil)
    files = json.dumps({**v2.files, "model.onnx": sha}, sort_keys=True)
    con.row_factory = sqlite3.Row
    con.execute("UPDATE versions SET sha256 = ?, files = ? WHERE version = 2", (sha, files))
    row = con.execute("SELECT * FROM versions WHERE version = 2").fetchone()
    names = ("version", "kind", "site", "path", "sha256", "parent", "created_at", "created_by", "metrics", "lineage", "files")
    digest = hashlib.sha256(json.dumps({k: row[k] for k in names}, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    register = con.execute("SELECT detail FROM audit WHERE action = 'register' AND version = 2").fetchone()
    detail = {**json.loads(register["detail"]), "files": json.loads(files), "row": digest}
    con.execute("UPDATE audit SET detail = ? WHERE action = 'register' AND version = 2", (json.dumps(detail, sort_keys=True),))
    con.execute("UPDATE audit SET sha256 = ? WHERE version = 2", (sha,))


def test_a_forgery_with_every_hash_nulled_fails_verify(tmp_path):
    home = _history(tmp_path)
    con = _attacker(tmp_path)
    _swap_served_model(home, con)
    con.execute("UPDATE audit SET prev_hash = NULL, row_hash = NULL")
    assert home.verify_files(home.registry.current("st-marys")) == []  # the files match the forged rows...
    cli = _verify(tmp_path)
    assert cli.exit_code == 1, cli.output  # ...but a chain with its hashes removed is not accepted as legacy
    assert "audit entry #1 (register v1) has no hash" in _one_line(cli.output)


@pytest.mark.parametrize("column", ["prev_hash", "row_hash"])
@pytest.mark.parametrize("entry", [1, 4, 7])
def test_one_null_hash_anywhere_in_the_chain_fails_verify(tmp_path, column, entry):
    _history(tmp_path)
    _attacker(tmp_path).execute(f"UPDATE audit SET {column} = NULL WHERE id = ?", (entry,))
    cli = _verify(tmp_path)
    assert cli.exit_code == 1 and f"audit entry #{entry} " in _one_line(cli.output)


def test_audit_head_prints_the_entry_count_and_hash_on_one_line(tmp_path):
    home = _history(tmp_path)
    assert _head(tmp_path) == f"7:{home.registry.verify().head}"


def test_cutting_the_newest_entry_is_caught_only_against_the_recorded_head(tmp_path):
    home = _history(tmp_path)
    home.registry.record("ana", "head_request", site="st-marys", detail={"task": "sepsis"})
    head = _head(tmp_path)
    assert head.startswith("8:")
    _attacker(tmp_path).execute("DELETE FROM audit WHERE id = 8")
    assert _verify(tmp_path).exit_code == 0  # nothing inside the file shows that the newest entry existed...
    cli = _verify(tmp_path, head)
    assert cli.exit_code == 1  # ...the head recorded elsewhere does
    assert len(cli.output.strip().splitlines()) == 1 and "the audit log has 7 entries, fewer than the 8 of the expected head" in _one_line(cli.output)


def test_a_consistently_rebuilt_chain_is_caught_only_against_the_recorded_head(tmp_path):
    home = _history(tmp_path)
    head = _head(tmp_path)
    con = _attacker(tmp_path)
    _swap_served_model(home, con)
    _rechain(con)
    assert _verify(tmp_path).exit_code == 0
    cli = _verify(tmp_path, head)
    assert cli.exit_code == 1 and "audit entry #7 no longer has the expected head's hash" in _one_line(cli.output)


def test_a_chain_that_grew_past_the_recorded_head_still_verifies_against_it(tmp_path):
    home = _history(tmp_path)
    head = _head(tmp_path)
    home.registry.promote("st-marys", 3, actor="ana")
    home.registry.record("ana", "head_request", site="st-marys")
    cli = _verify(tmp_path, head)
    assert cli.exit_code == 0, cli.output
    assert _head(tmp_path).startswith("9:")


@pytest.mark.parametrize("text", ["7", "7:xyz", "abc:" + "0" * 64, "-1:" + "0" * 64])
def test_a_malformed_expected_head_is_named(tmp_path, text):
    _history(tmp_path)
    cli = _verify(tmp_path, text)
    assert cli.exit_code == 2 and f"not a chain head: {text!r}" in _one_line(cli.output)


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
    assert result.entries == 5 and result.promotions == 2  # the two legacy entries, the migration's, a register and a promote
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        sqlite3.connect(tmp_path / "registry.sqlite").execute("UPDATE versions SET path = 'x' WHERE version = 1")


def _legacy_registry(tmp_path) -> None:
    """A registry written before the audit log was hash-chained: no hash columns at all."""
    con = sqlite3.connect(tmp_path / "registry.sqlite")
    con.executescript(LEGACY_SCHEMA)
    con.execute("INSERT INTO versions VALUES (1, 'personalized', 'st-marys', 'models/old', ?, NULL, 't', 'ana', '{}', '{}')", ("ab" * 32,))
    con.execute("INSERT INTO promotions VALUES (1, 'st-marys', 1, NULL, 't', 'ana')")
    con.execute("INSERT INTO audit VALUES (1, 't', 'ana', 'register', 'st-marys', 1, ?, ?)", ("ab" * 32, '{"kind": "personalized", "parent": null, "path": "models/old"}'))
    con.execute("INSERT INTO audit VALUES (2, 't', 'ana', 'promote', 'st-marys', 1, ?, '{\"from\": null}')", ("ab" * 32,))
    con.commit()
    con.close()


def test_a_legacy_log_is_hashed_once_at_migration_and_the_migration_is_recorded(tmp_path):
    _legacy_registry(tmp_path)
    SiteHome(tmp_path)
    SiteHome(tmp_path)  # a second opening finds nothing left to migrate
    con = sqlite3.connect(tmp_path / "registry.sqlite")
    rows = con.execute("SELECT id, action, detail, prev_hash, row_hash FROM audit ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(1, "register"), (2, "promote"), (3, "migrate")]
    assert json.loads(rows[2][2])["hashed_entries"] == 2
    assert all(r[3] and r[4] for r in rows)
    assert SiteHome(tmp_path).registry.verify().ok


def test_after_migration_an_unhashed_legacy_entry_fails_verify(tmp_path):
    _legacy_registry(tmp_path)
    SiteHome(tmp_path)
    _attacker(tmp_path).execute("UPDATE audit SET prev_hash = NULL, row_hash = NULL WHERE id = 1")
    cli = _verify(tmp_path)
    assert cli.exit_code == 1 and "audit entry #1 (register v1) has no hash" in _one_line(cli.output)


def test_serve_refuses_to_start_on_a_chain_that_does_not_verify(tmp_path, monkeypatch):
    import serving.server

    _history(tmp_path)
    started = []
    monkeypatch.setattr(serving.server, "run", lambda *args: started.append(args))  # never bind a port
    _attacker(tmp_path).execute("UPDATE audit SET prev_hash = NULL, row_hash = NULL")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cli = runner.invoke(app, ["serve", "--site-home", str(tmp_path), "--port", str(port)])
    assert not started and cli.exit_code == 2, cli.output
    assert len(cli.output.strip().splitlines()) == 1
    assert cli.output.startswith(f"error: refusing to start: {tmp_path / 'registry.sqlite'}") and "has no hash" in _one_line(cli.output)
