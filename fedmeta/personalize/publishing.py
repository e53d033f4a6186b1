"""Publishing a site's model: ONNX export, manifest, registration (and promotion), and reading it back.

Nothing here trains: :func:`publish` takes a :class:`~fedmeta.trained.TrainedModel`
from :mod:`fedmeta.personalize.adaptation` or :mod:`fedmeta.personalize.heads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedmeta.data.mapping import Mapping
from fedmeta.export import export_onnx
from fedmeta.manifest import Manifest, TaskOutput, sha256_file
from fedmeta.personalize.base import PersonalizationError
from fedmeta.registry import ModelVersion, RegistryError, SiteHome, current_user
from fedmeta.trained import TrainedModel
from fedmeta.training_range import merged

#: The audit action recording that a person personalized with mapping columns still flagged for review (``--accept-review``).
ACCEPT_REVIEW = "accept_review"


@dataclass
class Published:
    version: ModelVersion
    created: bool
    promoted: bool
    manifest: Manifest
    export_seconds: float


def data_lineage(path: str | Path | None, **extra) -> dict:
    """Which rows produced a model: the file and its SHA-256 (rows never leave the site; their hash does not reveal them)."""
    out = dict(extra)
    if path is not None:
        out.update({"file": str(Path(path).resolve()), "sha256": sha256_file(path)})
    return out


def publish(
    home: SiteHome,
    trained: TrainedModel,
    kind: Literal["personalized", "head"],
    site: str,
    parent: ModelVersion,
    base: ModelVersion,
    metrics: dict,
    data: dict,
    training: dict,
    shots: int | None = None,
    personalized_tasks: list[str] | None = None,
    promote: bool | None = None,
    actor: str | None = None,
    feature_ranges: dict[str, list[float]] | None = None,
    mapping: Mapping | None = None,
    review_accepted: bool = False,
) -> Published:
    """Export ``trained``, write its version folder and manifest, register it; promote it if asked.

    ``promote=None`` promotes only when the site has no promoted version yet.
    ``feature_ranges`` is the numeric features' range over the rows that
    trained it (:mod:`fedmeta.training_range`); a head's range also covers
    its parent's, whose rows trained the body beneath it.

    ``mapping`` is the site's mapping the rows were read with: the manifest
    keeps it (a head keeps its parent's), so prediction reads rows as
    training did, and the data lineage names its digest. With
    ``review_accepted``, the columns still under review are recorded in the
    audit log against the new version, with who accepted them.
    """
    actor = actor or current_user()
    recorded_mapping = None if mapping is None else mapping.model_dump(mode="json")
    if kind == "head":
        parent_manifest = home.load(parent)[0]
        feature_ranges = merged(parent_manifest.feature_ranges, feature_ranges)
        recorded_mapping = recorded_mapping or parent_manifest.mapping
    if mapping is not None:
        data = {**data, "mapping_sha256": mapping.digest()}
    # The file names its site: two sites whose weights agree (both kept the base as it is) still get a version each.
    exported = export_onnx(trained, metadata={"fedmeta.site": site, "fedmeta.kind": kind})
    personalized_tasks = personalized_tasks or []
    manifest = Manifest(
        kind=kind,
        site=site,
        model_file="model.onnx",
        sha256="",
        files={},
        schema=trained.schema.model_dump(mode="json"),
        tasks=[TaskOutput(name=t.name, kind=t.kind, classes=t.classes, personalized=t.name in personalized_tasks) for t in trained.schema.tasks],
        base_version=base.version,
        base_sha256=base.sha256,
        run_id=base.lineage.get("run_id"),
        privacy=base.lineage.get("privacy"),
        data=data,
        shots=shots,
        feature_ranges=feature_ranges,
        mapping=recorded_mapping,
        training=training,
        metrics=metrics,
        export={"exporter": exported.exporter, "max_abs_diff": exported.max_abs_diff, "seconds": round(exported.seconds, 4), "opset": 18},
    )
    files = {"model.onnx": exported.onnx_bytes, "state.pt": trained.to_bytes()}
    version, created = home.store(files, manifest, parent=parent.version, actor=actor)
    unreviewed = {c: {"feature": r.feature, "confidence": r.confidence} for c, r in mapping.columns.items() if r.review} if mapping is not None else {}
    if review_accepted and unreviewed:
        home.registry.record(actor, ACCEPT_REVIEW, site, version.version, {"mapping_sha256": mapping.digest(), "columns": unreviewed})
    promoted = False
    if promote or (promote is None and home.registry.current(site) is None):
        home.registry.promote(site, version.version, actor)
        promoted = True
    written, _ = home.load(version)
    return Published(version, created, promoted, written, exported.seconds)


def load_trained(home: SiteHome, version: ModelVersion) -> TrainedModel:
    """The torch weights of a registered site model (hash-verified), to keep training it."""
    if version.kind == "base":
        raise PersonalizationError(f"{version.label} is a global base model; load it with load_base")
    _, data = home.load(version, "state.pt")
    return TrainedModel.from_bytes(data, f"{home.folder(version) / 'state.pt'}")


def base_of(home: SiteHome, version: ModelVersion) -> ModelVersion:
    """The base a site version descends from: its region's when it was personalized from one, else the global base."""
    seen = version
    while seen.kind != "base":
        if seen.parent is None:
            raise RegistryError(f"{version.label} has no base model in its lineage")
        seen = home.registry.get(seen.parent)
    return seen
