"""The model registry: versions, lineage, the promoted version per site, and an append-only audit log.

:class:`Registry` is the interface; :class:`SQLiteRegistry` implements it
on one SQLite file (WAL mode, every write in a ``BEGIN IMMEDIATE``
transaction, so concurrent writers queue instead of corrupting it). A
server database could stand behind the same interface.

:class:`SiteHome` is a site's home folder: the registry file plus one folder
per model version holding its files and manifest::

    SITE_HOME/
      registry.sqlite
      models/<sha256 prefix>-<id>/
        model.onnx  state.pt  manifest.json     (site models)
        base_model.pt  manifest.json            (global base models)

Versions are numbered 1, 2, 3 ... across the registry and shown as ``v3``.
A global base has no site. Promotion is per site; rollback returns a site
to the version promoted before the current one, and repeated rollbacks keep
walking back. Every change is written to the audit log in the same
transaction as the change itself.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sqlite3
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.manifest import Manifest, ManifestError, load_verified, sha256_bytes, utc_now, write_version

REGISTRY_FILE = "registry.sqlite"
SITE_HOME_ENV = "FEDMETA_SITE_HOME"


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out (unknown version, nothing to roll back to, ...)."""


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers): still record something
        return f"uid:{os.getuid()}"


_MAX_VERSION = 2**63 - 1  # SQLite's INTEGER range


def parse_version(text: str | int) -> int:
    """``3``, ``"3"`` or ``"v3"`` -> 3: ASCII digits (after an optional ASCII ``v``), 1 to 2**63 - 1.

    Anything else, including non-ASCII digits such as ``"²"`` or ``"٣"``, is a
    :class:`RegistryError` naming the text.

    >>> parse_version("v12")
    12
    >>> parse_version("v²")
    Traceback (most recent call last):
    ...
    fedmeta.registry.RegistryError: not a model version: 'v²' (expected e.g. 3 or v3)
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise RegistryError(f"not a model version: {text!r} (expected e.g. 3 or v3)")
    if isinstance(text, int):
        if 1 <= text <= _MAX_VERSION:
            return text
        raise RegistryError(f"not a model version: {text if abs(text) < 10**30 else 'a 30+ digit number'} (expected 1 to {_MAX_VERSION})")
    raw = text
    digits = raw[1:] if raw[:1] in ("v", "V") else raw
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 19 or not 1 <= int(digits) <= _MAX_VERSION:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise RegistryError(f"not a model version: {shown!r} (expected e.g. 3 or v3)")
    return int(digits)


@dataclass(frozen=True)
class ModelVersion:
    version: int
    kind: str
    site: str | None
    path: str
    sha256: str
    parent: int | None
    created_at: str
    created_by: str
    metrics: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"v{self.version}"


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: str
    actor: str
    action: str
    site: str | None
    version: int | None
    sha256: str | None
    detail: dict


class Registry(ABC):
    """What fedmeta needs from a model registry."""

    @abstractmethod
    def register(
        self, kind: str, site: str | None, path: str, sha256: str, parent: int | None, metrics: dict, lineage: dict, actor: str
    ) -> tuple[ModelVersion, bool]:
        """Record a new version; returns it and True, or the existing version with this hash and False."""

    @abstractmethod
    def get(self, version: int) -> ModelVersion: ...

    @abstractmethod
    def by_sha256(self, sha256: str) -> ModelVersion | None: ...

    @abstractmethod
    def versions(self, site: str | None = None, kind: str | None = None) -> list[ModelVersion]: ...

    @abstractmethod
    def sites(self) -> list[str]: ...

    @abstractmethod
    def current(self, site: str) -> ModelVersion | None:
        """The promoted version of a site, if any."""

    @abstractmethod
    def promote(self, site: str, version: int, actor: str) -> ModelVersion: ...

    @abstractmethod
    def rollback(self, site: str, actor: str) -> ModelVersion:
        """Make the version promoted before the current one current again."""

    @abstractmethod
    def record(self, actor: str, action: str, site: str | None = None, version: int | None = None, detail: dict | None = None) -> None:
        """Append an event (e.g. a head request) to the audit log."""

    @abstractmethod
    def audit(self, site: str | None = None, limit: int | None = None) -> list[AuditEntry]: ...


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
    lineage    TEXT NOT NULL
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
    detail  TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_append_only_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS promotions_append_only_update BEFORE UPDATE ON promotions
    BEGIN SELECT RAISE(ABORT, 'promotion history is append-only'); END;
CREATE TRIGGER IF NOT EXISTS promotions_append_only_delete BEFORE DELETE ON promotions
    BEGIN SELECT RAISE(ABORT, 'promotion history is append-only'); END;
"""


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")

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
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @staticmethod
    def _audit(con: sqlite3.Connection, actor: str, action: str, site: str | None, version: int | None, sha256: str | None, detail: dict) -> None:
        con.execute(
            "INSERT INTO audit (at, actor, action, site, version, sha256, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (utc_now(), actor, action, site, version, sha256, json.dumps(detail, sort_keys=True)),
        )

    @staticmethod
    def _get(con: sqlite3.Connection, version: int) -> ModelVersion:
        row = con.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            last = con.execute("SELECT MAX(version) FROM versions").fetchone()[0]
            known = f"versions are v1..v{last}" if last else "the registry is empty"
            raise RegistryError(f"no model version v{version} in the registry ({known})")
        return _version(row)

    def register(self, kind, site, path, sha256, parent, metrics, lineage, actor):
        with self._transaction() as con:
            row = con.execute("SELECT * FROM versions WHERE sha256 = ?", (sha256,)).fetchone()
            if row is not None:
                return _version(row), False
            if parent is not None:
                self._get(con, parent)
            cur = con.execute(
                "INSERT INTO versions (kind, site, path, sha256, parent, created_at, created_by, metrics, lineage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, site, path, sha256, parent, utc_now(), actor, json.dumps(metrics, sort_keys=True), json.dumps(lineage, sort_keys=True)),
            )
            version = cur.lastrowid
            self._audit(con, actor, "register", site, version, sha256, {"kind": kind, "parent": parent, "path": path})
            return self._get(con, version), True

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
                raise RegistryError(f"{target.label} is a global base model; promote one of site {site!r}'s personalized or head versions")
            if target.site != site:
                raise RegistryError(f"{target.label} belongs to site {target.site!r}, not {site!r}")
            current = self._current_row(con, site)
            if current is not None and current["version"] == target.version:
                return target
            con.execute(
                "INSERT INTO promotions (site, version, previous, at, actor) VALUES (?, ?, ?, ?, ?)",
                (site, target.version, None if current is None else current["id"], utc_now(), actor),
            )
            self._audit(con, actor, "promote", site, target.version, target.sha256, {"from": None if current is None else current["version"]})
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
            con.execute(
                "INSERT INTO promotions (site, version, previous, at, actor) VALUES (?, ?, ?, ?, ?)",
                (site, target.version, previous["previous"], utc_now(), actor),
            )
            self._audit(con, actor, "rollback", site, target.version, target.sha256, {"from": current["version"]})
            return target

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
                AuditEntry(r["id"], r["at"], r["actor"], r["action"], r["site"], r["version"], r["sha256"], json.loads(r["detail"]))
                for r in con.execute(query, args)
            ]
        return rows[-limit:] if limit else rows


def default_site_home() -> Path:
    """``$FEDMETA_SITE_HOME``, else ``./site-home``."""
    return Path(os.environ.get(SITE_HOME_ENV, "site-home"))


class SiteHome:
    """A site's home folder: the registry plus one folder of files per model version."""

    def __init__(self, path: str | Path | None = None, registry: Registry | None = None):
        self.path = Path(path) if path is not None else default_site_home()
        self.registry = registry if registry is not None else SQLiteRegistry(self.path / REGISTRY_FILE)

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    def folder(self, version: ModelVersion) -> Path:
        return self.path / version.path

    def store(
        self, files: dict[str, bytes], manifest: Manifest, parent: int | None = None, actor: str | None = None
    ) -> tuple[ModelVersion, bool]:
        """Write a version's files and manifest, then register it.

        The folder is complete before the registry knows it. If a version
        with the same model hash exists, the new folder is removed and the
        existing version returned (with False).
        """
        sha = sha256_bytes(files[manifest.model_file])
        existing = self.registry.by_sha256(sha)
        if existing is not None:
            return existing, False
        relative = f"models/{sha[:16]}-{uuid.uuid4().hex[:8]}"
        written = write_version(self.path / relative, files, manifest)
        lineage = {
            k: v
            for k, v in {
                "base_version": written.base_version,
                "base_sha256": written.base_sha256,
                "run_id": written.run_id,
                "data": written.data or None,
                "shots": written.shots,
                "tasks": [t.name for t in written.tasks] or None,
                "privacy": written.privacy,
            }.items()
            if v is not None
        }
        version, created = self.registry.register(
            written.kind, written.site, relative, sha, parent, written.metrics, lineage, actor or current_user()
        )
        if not created:
            shutil.rmtree(self.path / relative, ignore_errors=True)  # lost a race to an identical model
        return version, created

    def load(self, version: ModelVersion | int, name: str | None = None) -> tuple[Manifest, bytes]:
        """A version's manifest and one file's bytes (the model file by default), hash-verified."""
        v = version if isinstance(version, ModelVersion) else self.registry.get(version)
        manifest, data = load_verified(self.folder(v), name)
        if name is None and manifest.sha256 != v.sha256:
            raise ManifestError(f"{self.folder(v)}: manifest hash {manifest.sha256} differs from the registry's {v.sha256} for {v.label}")
        return manifest, data

    def current(self, site: str | None = None) -> ModelVersion:
        """The promoted version of ``site`` (or of the only site in this home)."""
        site = self.only_site() if site is None else site
        version = self.registry.current(site)
        if version is None:
            raise RegistryError(f"site {site!r} has no promoted model in {self.path}; run `fedmeta personalize` or `fedmeta models promote`")
        return version

    def only_site(self) -> str:
        sites = self.registry.sites()
        if len(sites) != 1:
            listed = ", ".join(sites) if sites else "none"
            raise RegistryError(f"{self.path} holds models of {len(sites)} sites ({listed}); name one with --site")
        return sites[0]
