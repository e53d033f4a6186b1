"""The manifest written next to every model version, and its verification.

A version folder holds its files (``model.onnx`` and ``state.pt`` for a
site model, ``base_model.pt`` for a global base) and ``manifest.json``: the
SHA-256 of each file, the schema, the tasks with their kinds and classes,
the site's mapping to the schema if it has one,
lineage (base version, training run, data hash), shots, metrics, creation
time and library versions. :func:`read_manifest` recomputes every hash and
refuses a mismatch: that catches corruption, not tampering, since whoever
replaces a file can edit the manifest too. Loading a registered version goes
through :meth:`fedmeta.registry.SiteHome.load`, which checks the bytes
against the hashes the registry recorded at registration instead.

This module needs no torch: the prediction server imports it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from fedmeta.files import atomic_write_bytes, atomic_write_text

MANIFEST = "manifest.json"
FORMAT = 1
ModelKind = Literal["base", "personalized", "head"]


class ManifestError(RuntimeError):
    """A model folder whose files do not match its manifest, or no readable manifest at all."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("fedmeta", "torch", "onnx", "onnxruntime", "numpy", "flwr"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TaskOutput(BaseModel):
    """One served task: its output tensor and how to read it."""

    name: str
    kind: Literal["binary", "multiclass", "regression"]
    classes: list[str] | None = None
    personalized: bool = False


class Manifest(BaseModel):
    """What a model version is, where it came from and how well it did."""

    format: int = FORMAT
    kind: ModelKind
    site: str | None = None
    model_file: str
    sha256: str = Field(description="SHA-256 of model_file")
    files: dict[str, str] = Field(description="SHA-256 of every file in the version folder")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    tasks: list[TaskOutput] = Field(default_factory=list)
    base_version: int | None = None
    base_sha256: str | None = None
    run_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict, description="lineage of the rows used: file, sha256, rows")
    shots: int | None = None
    feature_ranges: dict[str, list[float]] | None = Field(
        None, description="each numeric feature's [min, max] over the site rows that trained the model; the server flags inputs outside it"
    )
    mapping: dict[str, Any] | None = Field(
        None, description="the site's mapping.json the model was personalized with (fedmeta.data.mapping): fedmeta predict applies it to rows "
        "in the site's own columns, codes and units"
    )
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    privacy: dict[str, Any] | None = Field(None, description="client-level DP of the federated training: epsilon, delta, noise, clip")
    export: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=utc_now)
    libraries: dict[str, str] = Field(default_factory=library_versions)

    model_config = {"populate_by_name": True}

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True)


def write_version(folder: str | Path, files: dict[str, bytes], manifest: Manifest) -> Manifest:
    """Write the files, then the manifest (each atomically); the manifest goes last, so it only ever describes complete files."""
    folder = Path(folder)
    if manifest.model_file not in files:
        raise ValueError(f"model_file {manifest.model_file!r} is not among the files {sorted(files)}")
    hashes = {name: sha256_bytes(data) for name, data in files.items()}
    manifest = manifest.model_copy(update={"files": hashes, "sha256": hashes[manifest.model_file]})
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    atomic_write_text(folder / MANIFEST, manifest.to_json())
    return manifest


def parse_manifest(data: bytes, path: str | Path) -> Manifest:
    """A manifest from its bytes (already checked by the caller); ``path`` names it in errors."""
    try:
        return Manifest.model_validate_json(data)
    except (ValidationError, ValueError):
        raise ManifestError(f"unreadable manifest {path}: not a fedmeta manifest") from None


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Load a version folder's manifest; with ``verify``, recompute every file's SHA-256 and refuse a mismatch."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"no manifest in {folder}: {MANIFEST} is missing") from None
    except (ValidationError, ValueError) as e:
        raise ManifestError(f"unreadable manifest {path}: {e}") from None
    if verify:
        for name, expected in manifest.files.items():
            file = folder / name
            if not file.exists():
                raise ManifestError(f"{file} is missing (listed in {path})")
            actual = sha256_file(file)
            if actual != expected:
                raise ManifestError(
                    f"{file} does not match its manifest: SHA-256 is {actual}, {path} says {expected}. "
                    "The file was modified or corrupted; refusing to load it."
                )
    return manifest


def load_verified(folder: str | Path, name: str | None = None) -> tuple[Manifest, bytes]:
    """A version's manifest and the bytes of one of its files (the model file by default), hash-checked as read.

    Reading and hashing the same bytes leaves no window for the file to change in between.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, verify=False)
    name = manifest.model_file if name is None else name
    if name not in manifest.files:
        raise ManifestError(f"{name} is not listed in {folder / MANIFEST}")
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{folder / name} is missing (listed in {folder / MANIFEST})") from None
    actual = sha256_bytes(data)
    if actual != manifest.files[name]:
        raise ManifestError(
            f"{folder / name} does not match its manifest: SHA-256 is {actual}, {folder / MANIFEST} says {manifest.files[name]}. "
            "The file was modified or corrupted; refusing to load it."
        )
    return manifest, data
