"""What a model registry is: versions, audit entries, the :class:`Registry` interface and version labels.

Versions are numbered 1, 2, 3 ... across a registry and shown as ``v3``. A
global base has no site. :mod:`fedmeta.registry.sqlite` implements the
interface; a server database could stand behind it too.
"""

from __future__ import annotations

import getpass
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

class RegistryError(RuntimeError):
    """A registry request that cannot be carried out (unknown version, nothing to roll back to, ...)."""


class AuditChainError(RegistryError):
    """The audit log does not verify, so nothing that trusts the registry (a server) may start on it."""


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
    fedmeta.registry.interface.RegistryError: not a model version: 'v²' (expected e.g. 3 or v3)
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
    files: dict[str, str] | None = None  # name -> SHA-256 recorded at registration; None for legacy rows

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
    row_hash: str | None = None


_HEAD = re.compile(r"([0-9]{1,19}):([0-9a-f]{64})")


@dataclass(frozen=True)
class ChainHead:
    """The audit chain's head as an operator records it elsewhere: the entry count and the newest entry's hash.

    >>> head = ChainHead.parse("37:" + "ab" * 32)
    >>> head.entries, str(head) == "37:" + "ab" * 32
    (37, True)
    """

    entries: int
    hash: str

    def __str__(self) -> str:
        return f"{self.entries}:{self.hash}"

    @property
    def short(self) -> str:
        return f"{self.entries}:{self.hash[:16]}..."

    @classmethod
    def parse(cls, text: str) -> ChainHead:
        match = _HEAD.fullmatch(text.strip())
        if match is None:
            shown = text if len(text) <= 80 else text[:80] + "..."
            raise RegistryError(f"not a chain head: {shown!r} (expected COUNT:SHA256, as printed by `fedmeta models audit --head`)")
        return cls(int(match[1]), match[2])


@dataclass(frozen=True)
class AuditVerification:
    """The result of walking the audit chain: its head, and every break found (empty when intact)."""

    entries: int
    versions: int
    promotions: int
    head: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def chain_head(self) -> ChainHead:
        return ChainHead(self.entries, self.head)


class Registry(ABC):
    """What fedmeta needs from a model registry."""

    @abstractmethod
    def register(
        self,
        kind: str,
        site: str | None,
        path: str,
        sha256: str,
        parent: int | None,
        metrics: dict,
        lineage: dict,
        actor: str,
        files: dict[str, str] | None = None,
    ) -> tuple[ModelVersion, bool]:
        """Record a new version (with the SHA-256 of each of its files); returns it and True, or the existing version with this hash and False."""

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

    @abstractmethod
    def verify(self, expect: ChainHead | None = None) -> AuditVerification:
        """Walk the audit chain and cross-check the versions and promotions against it (and, with ``expect``, that it still reaches that head)."""
