"""A site's home folder: the registry file plus one folder of files per model version.

::

    SITE_HOME/
      registry.sqlite
      models/<sha256 prefix>-<id>/
        model.onnx  state.pt  manifest.json     (site models)
        base_model.pt  manifest.json            (global base models)

Integrity. At registration the registry records the SHA-256 of every file of
the version, ``manifest.json`` included (column ``files``).
:meth:`SiteHome.load` reads a file's bytes once and checks them against that
record, never against the manifest's own list: a replaced ``model.onnx``
with a matching edit of ``manifest.json`` is refused. Versions registered
before ``files`` existed (legacy rows, ``files`` NULL) are checked against
the one hash they do have, the model file's ``sha256``; their other files
(``state.pt``) cannot be checked against the registry, so loading them is
refused with a message saying so.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from fedmeta.manifest import MANIFEST, Manifest, ManifestError, parse_manifest, sha256_bytes, write_version
from fedmeta.registry.interface import ModelVersion, Registry, RegistryError, current_user
from fedmeta.registry.sqlite import SQLiteRegistry

REGISTRY_FILE = "registry.sqlite"
SITE_HOME_ENV = "FEDMETA_SITE_HOME"


def default_site_home() -> Path:
    """``$FEDMETA_SITE_HOME``, else ``./site-home``."""
    return Path(os.environ.get(SITE_HOME_ENV, "site-home"))


class SiteHome:
    """A site's home folder: the registry plus one folder of files per model version.

    ``SiteHome(path)`` creates a missing home with its first stored
    version (the first ``fedmeta personalize`` at a site), readable by its
    owner only (0700, the registry file 0600), and not before: a command
    that fails before storing anything leaves no folder and no registry.
    :meth:`existing` refuses a missing one, for everything that only reads.
    """

    def __init__(self, path: str | Path | None = None, registry: Registry | None = None):
        self.path = Path(path) if path is not None else default_site_home()
        self.registry = registry if registry is not None else SQLiteRegistry(self.path / REGISTRY_FILE)

    @classmethod
    def existing(cls, path: str | Path | None = None) -> SiteHome:
        """The site home at ``path`` (default ``$FEDMETA_SITE_HOME`` or ``./site-home``); a missing one is an error, never created."""
        path = Path(path) if path is not None else default_site_home()
        if not (path / REGISTRY_FILE).is_file():
            what = "does not exist" if not path.exists() else f"has no {REGISTRY_FILE}"
            raise RegistryError(f"no site home at {path}: the folder {what} (check --site-home or ${SITE_HOME_ENV}; `fedmeta personalize` creates one)")
        return cls(path)

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    def folder(self, version: ModelVersion) -> Path:
        return self.path / version.path

    def store(
        self, files: dict[str, bytes], manifest: Manifest, parent: int | None = None, actor: str | None = None
    ) -> tuple[ModelVersion, bool]:
        """Write a version's files and manifest, then register it with the SHA-256 of every file, the manifest's included.

        The folder is complete before the registry knows it. If a version
        with the same model hash exists, the new folder is removed and the
        existing version returned (with False).
        """
        sha = sha256_bytes(files[manifest.model_file])
        existing = self.registry.by_sha256(sha)
        if existing is not None:
            return existing, False
        relative = f"models/{sha[:16]}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)  # models, keys and the audit log are the site's alone; an existing home keeps its mode
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
                "region": written.training.get("region") if written.kind == "base" else None,  # a regional base's, for listings
            }.items()
            if v is not None
        }
        hashes = {**written.files, MANIFEST: sha256_bytes(written.to_json().encode())}
        version, created = self.registry.register(
            written.kind, written.site, relative, sha, parent, written.metrics, lineage, actor or current_user(), files=hashes
        )
        if not created:
            shutil.rmtree(self.path / relative, ignore_errors=True)  # lost a race to an identical model
        return version, created

    def load(self, version: ModelVersion | int, name: str | None = None) -> tuple[Manifest, bytes]:
        """A version's manifest and one file's bytes (the model file by default), each checked against the registry's record.

        The bytes returned are the bytes hashed: nothing can change between
        the check and the use.
        """
        v = version if isinstance(version, ModelVersion) else self.registry.get(version)
        folder = self.folder(v)
        if v.files is None:  # a legacy row: only the model file's hash was recorded
            manifest = parse_manifest(self._read(v, MANIFEST), folder / MANIFEST)
            name = manifest.model_file if name is None else name
            if name != manifest.model_file:
                raise ManifestError(
                    f"{folder / name}: {v.label} was registered before the registry recorded a hash per file, so {name} cannot be "
                    "checked against it; refusing to load it (register a new version, e.g. with `fedmeta personalize`)"
                )
            data = self._read(v, name)
            self._check(v, name, data, v.sha256)
            return manifest, data
        if name is None:
            name = next((n for n, h in sorted(v.files.items()) if h == v.sha256 and n != MANIFEST), None)
            if name is None:
                raise ManifestError(f"{v.label}: the registry lists no file with the model hash {v.sha256[:16]}...")
        if name not in v.files:
            raise ManifestError(f"{folder / name}: not a file of {v.label} in the registry (its files: {', '.join(sorted(v.files))})")
        data = self._read(v, name)
        self._check(v, name, data, v.files[name])
        manifest_bytes = self._read(v, MANIFEST)
        if MANIFEST not in v.files:
            raise ManifestError(f"{folder / MANIFEST}: the registry recorded no hash for the manifest of {v.label}; refusing to trust it")
        self._check(v, MANIFEST, manifest_bytes, v.files[MANIFEST])
        return parse_manifest(manifest_bytes, folder / MANIFEST), data

    def verify_files(self, version: ModelVersion) -> list[str]:
        """Every file of a version checked against the registry; returns one problem per file that fails (empty when all match)."""
        names = [MANIFEST] + sorted(n for n in (version.files or {}) if n != MANIFEST)
        problems = []
        for name in names:
            try:
                self.load(version, None if name == MANIFEST else name)
            except ManifestError as e:
                problems.append(str(e))
        return list(dict.fromkeys(problems))

    def _read(self, v: ModelVersion, name: str) -> bytes:
        path = self.folder(v) / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"{path} is missing ({v.label} was registered with it)") from None
        except OSError as e:
            raise ManifestError(f"cannot read {path}: {e.strerror}") from None

    def _check(self, v: ModelVersion, name: str, data: bytes, expected: str) -> None:
        actual = sha256_bytes(data)
        if actual != expected:
            raise ManifestError(
                f"{self.folder(v) / name} does not match the hash the registry recorded for {v.label} at registration: "
                f"SHA-256 is {actual[:16]}..., the registry says {expected[:16]}... The file was modified or replaced; refusing to load it."
            )

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
