"""API keys: created and revoked with the CLI, stored hashed at rest, checked on every route but the health probes.

Keys are 256-bit random tokens (``fm_...``), so a plain SHA-256 is a safe
at-rest form: nothing about a key can be recovered from the file, and there
is no password to brute-force. The file (``SITE_HOME/api_keys.json``) is
written atomically with mode 0600 and re-read when it changes, so a
revocation takes effect on a running server within a second. A key file
readable by others is still used, with one warning line in the log; an
unreadable (corrupt) key file refuses every request with the same 503 until
it is fixed, and says why once in the log.

Send the key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
Roles are ordered, each admitted wherever a smaller one is:

- no key: ``GET /v2/health/live`` and ``GET /v2/health/ready`` only, for
  Kubernetes and KServe probes, which send none; they answer ``{"live":
  true}`` and ``{"ready": true}`` and name no model, version or hash;
- ``predict``: ``POST /v1/predict``, ``GET /v1/models``, ``GET /metrics``,
  ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``, and the API's
  own description, ``GET /openapi.json`` and (with ``docs`` on) ``GET /docs``;
- ``department``: also ``POST /v1/heads`` and ``GET /v1/heads/jobs/{job_id}``,
  for the jobs this key requested (another's is a 404, as an unknown id);
- ``admin``: also ``POST /v1/models/{version}/promote`` and ``POST
  /v1/models/rollback``, every head job's status, and ``"promote": true`` in
  a head request (which a site policy may also grant departments).

The coordinator console (:mod:`fedmeta.console`) has roles of its own,
``viewer`` (reads runs) and ``coordinator`` (also launches, stops and resumes
them), kept in the same file: a console key opens no serving route and a
serving key no console route.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmeta.files import atomic_write_json
from fedmeta.manifest import utc_now
from serving.errors import ApiError

KEYS_FILE = "api_keys.json"
ROLES = ("predict", "department", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
#: The coordinator console's roles (fedmeta.console), ordered apart: a console key opens no serving route, and a serving key no console route.
CONSOLE_ROLES = ("viewer", "coordinator")
CONSOLE_RANK = {role: i for i, role in enumerate(CONSOLE_ROLES)}
log = logging.getLogger("fedmeta.serving")


class KeyManagementError(ValueError):
    """A key-management request that cannot be carried out."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    sha256: str
    created_at: str
    revoked_at: str | None = None


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key a request presents: ``X-API-Key``, else an ``Authorization: Bearer`` token (the first of each header counts).

    One pass over the raw ASGI headers: building Starlette's ``Headers`` and asking it twice cost ~2 us per request.

    >>> presented_key([(b"authorization", b"bearer fm_a "), (b"x-api-key", b"fm_b")]), presented_key([(b"authorization", b"Basic x")])
    ('fm_b', None)
    """
    auth = None
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1")
        if name == b"authorization" and auth is None:
            auth = value
    if auth is not None and auth[:7].lower() == b"bearer ":
        return auth[7:].decode("latin-1").strip()
    return None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The site's API keys (hashed), with a cached lookup that follows changes to the file."""

    def __init__(self, site_home: str | Path):
        self.path = Path(site_home) / KEYS_FILE
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, inode) of the file last read
        self._checked = 0.0
        self._by_hash: dict[str, ApiKey] = {}
        self._unreadable: str | None = None

    # --- management (CLI) ------------------------------------------------------
    def keys(self) -> list[ApiKey]:
        if not self.path.exists():
            return []
        try:
            keys = [ApiKey(**k) for k in json.loads(self.path.read_text())["keys"]]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise KeyManagementError(f"unreadable key file {self.path}: {type(e).__name__}") from None
        for k in keys:
            if (k.role not in RANK and k.role not in CONSOLE_RANK) or not isinstance(k.sha256, str):
                raise KeyManagementError(f"unreadable key file {self.path}: key {str(k.id)[:16]!r} has an unknown role or hash")
        return keys

    def create(self, name: str, role: str) -> tuple[ApiKey, str]:
        """A new key; the secret is returned once and only its hash is stored."""
        if role not in RANK and role not in CONSOLE_RANK:
            raise KeyManagementError(f"role must be one of {list(ROLES + CONSOLE_ROLES)}, got {role!r}")
        if not name.strip():
            raise KeyManagementError("a key needs a name (who or what uses it)")
        secret = "fm_" + secrets.token_urlsafe(32)
        with self._lock:
            keys = self.keys()
            key = ApiKey(id=secrets.token_hex(4), name=name, role=role, sha256=_digest(secret), created_at=utc_now())
            atomic_write_json(self.path, {"keys": [asdict(k) for k in keys + [key]]}, private=True)
        return key, secret

    def revoke(self, key_id: str) -> ApiKey:
        with self._lock:
            keys = self.keys()
            match = [k for k in keys if k.id == key_id]
            if not match:
                raise KeyManagementError(f"no key with id {key_id!r}; `fedmeta keys list` shows them")
            if match[0].revoked_at:
                raise KeyManagementError(f"key {key_id!r} was already revoked at {match[0].revoked_at}")
            revoked = ApiKey(**{**asdict(match[0]), "revoked_at": utc_now()})
            atomic_write_json(self.path, {"keys": [asdict(revoked if k.id == key_id else k) for k in keys]}, private=True)
        return revoked

    # --- checking (server) -------------------------------------------------------
    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                seen = (st.st_mtime_ns, st.st_ino)
            except FileNotFoundError:
                st, seen = None, None
            if seen == self._seen:
                return
            try:
                by_hash = {k.sha256: k for k in self.keys() if not k.revoked_at}
            except KeyManagementError as e:
                # Refuse everything, consistently, until the file is fixed: never fall back to an older key set.
                self._by_hash, self._unreadable = {}, "the server's API key file is unreadable; the operator must fix or recreate it"
                log.error(json.dumps({"event": "key_file_unreadable", "path": str(self.path), "error": str(e)[:300], "effect": "every request is refused with 503"}))
            else:
                self._by_hash, self._unreadable = by_hash, None
                if st is not None and st.st_mode & 0o077:
                    log.warning(json.dumps({"event": "key_file_permissions", "path": str(self.path), "mode": oct(st.st_mode & 0o777),
                                            "hint": f"chmod 600 {self.path}: other users can read the key hashes"}))
            self._seen = seen

    def authorize(self, headers: list[tuple[bytes, bytes]], role: str) -> ApiKey:
        """The caller's key if it may act as ``role``; 401 without a valid key, 403 with too small a role.

        ``headers`` are the request's raw ASGI headers (``scope["headers"]``, names lower-case).
        """
        secret = presented_key(headers)
        if not secret:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", {"WWW-Authenticate": "Bearer"})
        self._refresh()
        if self._unreadable:
            raise ApiError(503, self._unreadable, {"Retry-After": "30"})
        key = self._by_hash.get(_digest(secret))
        if key is None:
            raise ApiError(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
        ranks = RANK if role in RANK else CONSOLE_RANK
        if key.role not in ranks or ranks[key.role] < ranks[role]:
            raise ApiError(403, f"this route needs the {role!r} role; key {key.name!r} has {key.role!r}")
        return key
