"""The registry in one SQLite file, with a hash-chained, append-only audit log.

WAL mode and every write in a ``BEGIN IMMEDIATE`` transaction, so concurrent
writers queue instead of corrupting it. Every change is written to the audit
log in the same transaction as the change itself.

Tamper evidence. Every audit row is an entry of a hash chain
(:mod:`fedmeta.registry.chain`); ``register`` rows also hold the hash of the
``versions`` row they wrote and ``promote``/``rollback`` rows the hash of
their ``promotions`` row. :meth:`SQLiteRegistry.verify` walks the chain and
cross-checks both tables. Triggers refuse UPDATE and DELETE on all three
tables and any INSERT over an existing id (which is what ``INSERT OR
REPLACE`` / ``REPLACE INTO`` would do; their implicit deletes do not fire
delete triggers). None of this stops someone who can write the file from
dropping the triggers and rewriting or cutting the chain consistently: only
the chain head, recorded somewhere they cannot write (``fedmeta models audit
--head``) and checked with ``--verify --expect``, detects that.

The file is created 0600 in a folder created 0700: the log is evidence, and
nobody else on the machine needs to read it. It is created by the first
write, not by :class:`SQLiteRegistry` itself: until then reads answer as an
empty registry, so a command that fails before registering anything leaves
no file behind.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmeta.manifest import utc_now
from fedmeta.registry.chain import AUDIT_FIELDS, GENESIS, MIGRATE, canonical, digest, fields, legacy_hashes, link, reaches, walk
from fedmeta.registry.interface import AuditEntry, AuditVerification, ChainHead, ModelVersion, Registry, RegistryError, current_user


_AUDIT_UPDATE_TRIGGER = """CREATE TRIGGER IF NOT EXISTS audit_append_only_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL CHECK (kind IN ('base', 'personalized', 'head')),
    site       TEXT,
    path       TEXT NOT NULL,
    sha256     TEXT NOT NULL UNIQUE,
    parent     INTEGER REFERENCES versions(version),
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    metrics    TEXT NOT NULL,
    lineage    TEXT NOT NULL,
    files      TEXT
);
CREATE TABLE IF NOT EXISTS promotions (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    site     TEXT NOT NULL,
    version  INTEGER NOT NULL REFERENCES versions(version),
    previous INTEGER REFERENCES promotions(id),
    at       TEXT NOT NULL,
    actor    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS promotions_site ON promotions(site, id);
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    site    TEXT,
    version INTEGER,
    sha256  TEXT,
    detail  TEXT NOT NULL,
    prev_hash TEXT,
    row_hash  TEXT
);
%s
CREATE TRIGGER IF NOT EXISTS audit_append_only_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS promotions_append_only_update BEFORE UPDATE ON promotions
    BEGIN SELECT RAISE(ABORT, 'promotion history is append-only'); END;
CREATE TRIGGER IF NOT EXISTS promotions_append_only_delete BEFORE DELETE ON promotions
    BEGIN SELECT RAISE(ABORT, 'promotion history is append-only'); END;
""" % _AUDIT_UPDATE_TRIGGER

# Added after the first release: triggers that only mention ids and hashes,
# created on new and old databases alike (after the migration's ALTER TABLE).
_IMMUTABLE = """
CREATE TRIGGER IF NOT EXISTS versions_immutable_update BEFORE UPDATE ON versions
    BEGIN SELECT RAISE(ABORT, 'registered versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS versions_immutable_delete BEFORE DELETE ON versions
    BEGIN SELECT RAISE(ABORT, 'registered versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS versions_no_overwrite BEFORE INSERT ON versions
    WHEN EXISTS (SELECT 1 FROM versions WHERE version = NEW.version OR sha256 = NEW.sha256)
    BEGIN SELECT RAISE(ABORT, 'registered versions are immutable: a version with this id or hash exists'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_overwrite BEFORE INSERT ON audit
    WHEN EXISTS (SELECT 1 FROM audit WHERE id = NEW.id)
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: an entry with this id exists'); END;
CREATE TRIGGER IF NOT EXISTS promotions_no_overwrite BEFORE INSERT ON promotions
    WHEN EXISTS (SELECT 1 FROM promotions WHERE id = NEW.id)
    BEGIN SELECT RAISE(ABORT, 'promotion history is append-only: a promotion with this id exists'); END;
"""

_MIGRATIONS = {"versions": [("files", "TEXT")], "audit": [("prev_hash", "TEXT"), ("row_hash", "TEXT")]}


_VERSION_FIELDS = ("version", "kind", "site", "path", "sha256", "parent", "created_at", "created_by", "metrics", "lineage", "files")
_PROMOTION_FIELDS = ("id", "site", "version", "previous", "at", "actor")


def _version(row: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        version=row["version"],
        kind=row["kind"],
        site=row["site"],
        path=row["path"],
        sha256=row["sha256"],
        parent=row["parent"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        metrics=json.loads(row["metrics"]),
        lineage=json.loads(row["lineage"]),
        files=None if row["files"] is None else json.loads(row["files"]),
    )


class SQLiteRegistry(Registry):
    """The registry in one SQLite file.

    >>> import tempfile, pathlib
    >>> reg = SQLiteRegistry(pathlib.Path(tempfile.mkdtemp()) / "registry.sqlite")
    >>> v, created = reg.register("personalized", "st-marys", "models/a", "ab" * 32, None, {}, {}, actor="ana")
    >>> reg.promote("st-marys", v.version, actor="ana").label
    'v1'
    >>> [e.action for e in reg.audit()]
    ['register', 'promote']
    """

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        self._opened = False
        if self.path.exists():  # opened (and migrated) now, so a corrupt file is refused before anything relies on it
            self._open()

    def _open(self) -> None:
        """Create the file (0600, in a folder created 0700) if missing, then its tables and migrations."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # An empty file is an empty SQLite database: creating it here, not in connect, is what sets its mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass  # an existing registry keeps the mode its operator gave it
        except OSError as e:
            raise RegistryError(f"cannot create the registry {self.path}: {e.strerror}") from None
        try:
            self._create()
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"{self.path} is not a readable fedmeta registry ({e})") from None
        self._opened = True

    def _create(self) -> None:
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            con.execute("BEGIN IMMEDIATE")
            try:
                added = set()
                for table, columns in _MIGRATIONS.items():
                    have = {r["name"] for r in con.execute(f"PRAGMA table_info({table})")}
                    for name, kind in columns:
                        if name not in have:
                            con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                            added.add(f"{table}.{name}")
                for statement in _IMMUTABLE.split("END;"):
                    if statement.strip():
                        con.execute(statement + "END;")
                self._migrate_legacy_log(con, columns_added="audit.row_hash" in added)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @classmethod
    def _migrate_legacy_log(cls, con: sqlite3.Connection, columns_added: bool) -> None:
        """Hash a pre-chain log once and record it; the update trigger is lifted only inside this transaction."""
        if con.execute("SELECT 1 FROM audit WHERE row_hash IS NULL AND prev_hash IS NULL LIMIT 1").fetchone() is None:
            return
        hashes = legacy_hashes(con.execute("SELECT * FROM audit ORDER BY id").fetchall(), columns_added)
        if not hashes:
            return
        con.execute("DROP TRIGGER IF EXISTS audit_append_only_update")
        con.executemany("UPDATE audit SET prev_hash = ?, row_hash = ? WHERE id = ?", hashes)
        con.execute(_AUDIT_UPDATE_TRIGGER)
        cls._audit(con, current_user(), MIGRATE, None, None, None, {
            "hashed_entries": len(hashes), "why": "written before the audit log was hash-chained; hashed once, when this registry was first opened with the chain",
        })

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise RegistryError(f"cannot open the registry {self.path}: {e}") from None
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    @contextmanager
    def _empty(self) -> Iterator[sqlite3.Connection]:
        """An empty registry in memory: what reads see before the first write has created the file."""
        con = sqlite3.connect(":memory:", isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.executescript(_SCHEMA)
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        if not self._opened and (write or self.path.exists()):
            self._open()
        with self._connect() if self._opened else self._empty() as con:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @staticmethod
    def _chain_head(con: sqlite3.Connection) -> tuple[int, str]:
        """The last audit id and its hash; an unhashed newest entry is refused, never chained onto (that would vouch for it)."""
        last = con.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        if last is None:
            return 0, GENESIS
        if last["row_hash"] is None:
            raise RegistryError(f"audit entry #{last['id']} has no hash: refusing to extend an audit log that does not verify "
                                "(see `fedmeta models audit --verify`)")
        return last["id"], last["row_hash"]

    @classmethod
    def _audit(cls, con: sqlite3.Connection, actor: str, action: str, site: str | None, version: int | None, sha256: str | None, detail: dict) -> None:
        """Append one chained entry (inside the caller's write transaction, so the head cannot move under it)."""
        last_id, prev_hash = cls._chain_head(con)
        row = {"id": last_id + 1, "at": utc_now(), "actor": actor, "action": action, "site": site, "version": version, "sha256": sha256,
               "detail": json.dumps(detail, sort_keys=True)}
        con.execute(
            "INSERT INTO audit (id, at, actor, action, site, version, sha256, detail, prev_hash, row_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*[row[k] for k in AUDIT_FIELDS], prev_hash, link(prev_hash, row)),
        )

    @staticmethod
    def _get(con: sqlite3.Connection, version: int) -> ModelVersion:
        row = con.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            last = con.execute("SELECT MAX(version) FROM versions").fetchone()[0]
            known = f"versions are v1..v{last}" if last else "the registry is empty"
            raise RegistryError(f"no model version v{version} in the registry ({known})")
        return _version(row)

    def register(self, kind, site, path, sha256, parent, metrics, lineage, actor, files=None):
        with self._transaction() as con:
            row = con.execute("SELECT * FROM versions WHERE sha256 = ?", (sha256,)).fetchone()
            if row is not None:
                return _version(row), False
            if parent is not None:
                self._get(con, parent)
            if files is not None and sha256 not in files.values():
                raise RegistryError(f"the model hash {sha256} is not among the version's file hashes")
            cur = con.execute(
                "INSERT INTO versions (kind, site, path, sha256, parent, created_at, created_by, metrics, lineage, files) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, site, path, sha256, parent, utc_now(), actor, json.dumps(metrics, sort_keys=True), json.dumps(lineage, sort_keys=True),
                 None if files is None else json.dumps(files, sort_keys=True)),
            )
            version = cur.lastrowid
            written = con.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
            detail = {"kind": kind, "parent": parent, "path": path, "files": files, "row": digest(canonical(fields(written, _VERSION_FIELDS)))}
            self._audit(con, actor, "register", site, version, sha256, detail)
            return _version(written), True

    def get(self, version: int) -> ModelVersion:
        with self._transaction(write=False) as con:
            return self._get(con, int(version))

    def by_sha256(self, sha256: str) -> ModelVersion | None:
        with self._transaction(write=False) as con:
            row = con.execute("SELECT * FROM versions WHERE sha256 = ?", (sha256,)).fetchone()
            return None if row is None else _version(row)

    def versions(self, site: str | None = None, kind: str | None = None) -> list[ModelVersion]:
        query, args = "SELECT * FROM versions WHERE 1=1", []
        if site is not None:
            query += " AND site = ?"
            args.append(site)
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        with self._transaction(write=False) as con:
            return [_version(r) for r in con.execute(query + " ORDER BY version", args)]

    def sites(self) -> list[str]:
        with self._transaction(write=False) as con:
            return [r[0] for r in con.execute("SELECT DISTINCT site FROM versions WHERE site IS NOT NULL ORDER BY site")]

    @staticmethod
    def _current_row(con: sqlite3.Connection, site: str) -> sqlite3.Row | None:
        return con.execute("SELECT * FROM promotions WHERE site = ? ORDER BY id DESC LIMIT 1", (site,)).fetchone()

    def current(self, site: str) -> ModelVersion | None:
        with self._transaction(write=False) as con:
            row = self._current_row(con, site)
            return None if row is None else self._get(con, row["version"])

    def promote(self, site: str, version: int, actor: str) -> ModelVersion:
        with self._transaction() as con:
            target = self._get(con, int(version))
            if target.kind == "base":
                raise RegistryError(f"{target.label} is a global base model; only a site's personalized or head versions can be promoted")
            if target.site != site:
                raise RegistryError(f"{target.label} belongs to site {target.site!r}, not {site!r}")
            current = self._current_row(con, site)
            if current is not None and current["version"] == target.version:
                return target
            promotion = self._insert_promotion(con, site, target.version, None if current is None else current["id"], actor)
            self._audit(con, actor, "promote", site, target.version, target.sha256, {"from": None if current is None else current["version"], **promotion})
            return target

    def rollback(self, site: str, actor: str) -> ModelVersion:
        with self._transaction() as con:
            current = self._current_row(con, site)
            if current is None:
                raise RegistryError(f"site {site!r} has no promoted version to roll back")
            if current["previous"] is None:
                raise RegistryError(f"site {site!r} has no earlier promoted version than v{current['version']} to roll back to")
            previous = con.execute("SELECT * FROM promotions WHERE id = ?", (current["previous"],)).fetchone()
            target = self._get(con, previous["version"])
            promotion = self._insert_promotion(con, site, target.version, previous["previous"], actor)
            self._audit(con, actor, "rollback", site, target.version, target.sha256, {"from": current["version"], **promotion})
            return target

    @staticmethod
    def _insert_promotion(con: sqlite3.Connection, site: str, version: int, previous: int | None, actor: str) -> dict:
        """Append a promotions row; returns what its audit entry records about it (its id and the hash of the row)."""
        cur = con.execute("INSERT INTO promotions (site, version, previous, at, actor) VALUES (?, ?, ?, ?, ?)", (site, version, previous, utc_now(), actor))
        row = con.execute("SELECT * FROM promotions WHERE id = ?", (cur.lastrowid,)).fetchone()
        return {"promotion": row["id"], "row": digest(canonical(fields(row, _PROMOTION_FIELDS)))}

    def record(self, actor: str, action: str, site: str | None = None, version: int | None = None, detail: dict | None = None) -> None:
        with self._transaction() as con:
            sha = None if version is None else self._get(con, version).sha256
            self._audit(con, actor, action, site, version, sha, detail or {})

    def audit(self, site: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        query, args = "SELECT * FROM audit", []
        if site is not None:
            query += " WHERE site = ?"
            args.append(site)
        query += " ORDER BY id"
        with self._transaction(write=False) as con:
            rows = [
                AuditEntry(r["id"], r["at"], r["actor"], r["action"], r["site"], r["version"], r["sha256"], json.loads(r["detail"]), r["row_hash"])
                for r in con.execute(query, args)
            ]
        return rows[-limit:] if limit else rows

    def chain_head(self) -> ChainHead:
        """The entry count and the newest entry's hash: record it elsewhere to detect a rewrite or a cut of the log."""
        with self._transaction(write=False) as con:
            count = con.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            return ChainHead(count, self._chain_head(con)[1])

    def verify(self, expect: ChainHead | None = None) -> AuditVerification:
        with self._transaction(write=False) as con:
            audit = con.execute("SELECT * FROM audit ORDER BY id").fetchall()
            versions = con.execute("SELECT * FROM versions ORDER BY version").fetchall()
            promotions = con.execute("SELECT * FROM promotions ORDER BY id").fetchall()
        recomputed, problems = walk(audit)
        if expect is not None and (missed := reaches(recomputed, expect)):
            problems.insert(0, missed)
        head = recomputed[-1][1] if recomputed else GENESIS
        details = [(row, _json_or_none(row["detail"])) for row in audit]
        registered = {row["version"]: (row, d) for row, d in details if row["action"] == "register" and row["version"] is not None}
        for v in versions:
            entry = registered.pop(v["version"], None)
            if entry is None:
                problems.append(f"version v{v['version']} has no register entry in the audit log")
                continue
            row, detail = entry
            if detail is None or row["sha256"] != v["sha256"] or detail.get("path") != v["path"] or detail.get("kind") != v["kind"] or detail.get("parent") != v["parent"]:
                problems.append(f"version v{v['version']} differs from its register entry #{row['id']} (sha256, path, kind or parent rewritten)")
            elif "row" in detail and detail["row"] != digest(canonical(fields(v, _VERSION_FIELDS))):
                problems.append(f"version v{v['version']} was rewritten after registration (its row no longer matches entry #{row['id']})")
        for number, (row, _) in sorted(registered.items()):
            problems.append(f"audit entry #{row['id']} registered v{number}, which is missing from the versions table")
        moves = [(row, d) for row, d in details if row["action"] in ("promote", "rollback")]
        by_id = {d["promotion"]: (row, d) for row, d in moves if d and "promotion" in d}
        legacy = [(row, d) for row, d in moves if not d or "promotion" not in d]
        for index, p in enumerate(promotions):
            entry = by_id.pop(p["id"], None)
            if entry is None and index < len(legacy):
                row, _ = legacy[index]  # before the chain, promotions and their entries were written one for one, in order
                if row["site"] != p["site"] or row["version"] != p["version"]:
                    problems.append(f"promotion #{p['id']} (site {p['site']!r}, v{p['version']}) differs from its audit entry #{row['id']}")
                continue
            if entry is None:
                problems.append(f"promotion #{p['id']} (site {p['site']!r}, v{p['version']}) has no audit entry: it was written outside fedmeta")
                continue
            row, detail = entry
            if row["site"] != p["site"] or row["version"] != p["version"] or detail.get("row") != digest(canonical(fields(p, _PROMOTION_FIELDS))):
                problems.append(f"promotion #{p['id']} (site {p['site']!r}, v{p['version']}) was rewritten: it no longer matches audit entry #{row['id']}")
        for number, (row, _) in sorted(by_id.items()):
            problems.append(f"audit entry #{row['id']} recorded promotion #{number}, which is missing from the promotions table")
        return AuditVerification(len(audit), len(versions), len(promotions), head, problems)


def _json_or_none(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
