"""The base model at a site: read from a training run or the registry, and recorded in the registry.

:func:`load_base` reads a meta-trained base (a run folder's ``base_model.pt``,
the file itself, or a registry version such as ``v3``); :func:`register_base`
records it once per hash, a regional base as the child of the global one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmeta.data.schema import Schema
from fedmeta.data.site import SiteData
from fedmeta.fl.aggregation import unflatten_state
from fedmeta.fl.config import RunConfig
from fedmeta.manifest import Manifest, sha256_bytes
from fedmeta.registry import ModelVersion, RegistryError, SiteHome, parse_version
from fedmeta.trained import ModelMismatchError, TrainedModel

BASE_FILE = "base_model.pt"


class PersonalizationError(ValueError):
    """A personalization or head request that cannot run as asked (too few rows, wrong mode, ...)."""


@dataclass
class GlobalBase:
    """A meta-trained base model as a training run wrote it: the global base, or a region's (:attr:`lineage` set)."""

    state: dict[str, dict[str, torch.Tensor]]
    config: RunConfig
    round: int
    data: bytes = field(repr=False)
    source: str
    version: int | None = None
    privacy: dict | None = None
    statistics: dict[str, tuple[float, float]] | None = None  # the normalization the federation computed
    lineage: dict | None = None  # a regional base's: level, region, sites, global round and hash (None for the global base)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)

    @property
    def run_id(self) -> str:
        return f"{self.config.name}-{self.config.digest()[:12]}"

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.config.model.hidden)

    @property
    def adaptation(self) -> dict:
        """The shots, steps and rate the run evaluated personalization with: sensible defaults for this base."""
        ev = self.config.evaluation
        return {"shots": ev.shots, "steps": ev.steps, "lr": ev.lr if ev.lr is not None else self.config.algorithm.lr}

    def schema_for(self, schema: Schema, source: str = "the schema") -> Schema:
        """``schema`` with the normalization the federation computed for this base.

        Raises :class:`~fedmeta.data.SchemaError` naming the feature when
        ``schema`` states a mean or std other than the base's: a model fed
        rows normalized another way than in training answers nonsense.
        """
        if not self.statistics:
            return schema
        schema.check_statistics(self.statistics, source, f"base model {self.source}")
        return schema.with_statistics(self.statistics)

    def for_schema(self, schema: Schema) -> TrainedModel:
        """The base's weights paired with a site's schema (which must describe the same features and tasks),
        normalized as the federation normalized (:meth:`schema_for`)."""
        schema = self.schema_for(schema)
        try:
            return TrainedModel(schema, self.hidden, {g: dict(v) for g, v in self.state.items()}, {"base": self.source, "algorithm": self.config.algorithm.name})
        except ModelMismatchError as e:
            raise ModelMismatchError(f"base model {self.source}: {e}. Use the federation's schema; for a task new to it, use `fedmeta heads add`") from None


def check_normalization(model: TrainedModel, site: SiteData) -> None:
    """Refuse a site whose rows were encoded with other normalization statistics than ``model``'s schema states.

    Such rows reach the model shifted and scaled differently from training; this
    happens when a site is loaded with a schema that leaves ``mean``/``std`` to
    the federation (load it with :meth:`GlobalBase.schema_for` instead).
    """
    ours, theirs = model.schema.statistics(), site.schema.statistics()
    for name in sorted(set(ours) | set(theirs)):
        if name not in ours or name not in theirs or not np.allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-9):
            raise PersonalizationError(
                f"site {site.name!r}: feature {name!r} was normalized with {_stats_text(theirs.get(name))} but the model "
                f"expects {_stats_text(ours.get(name))}; load the site's rows with the base's schema: "
                "load_site(path, base.schema_for(Schema.load(schema_path)))"
            )


def _stats_text(stats: tuple[float, float] | None) -> str:
    return "no statistics (raw values)" if stats is None else f"mean {stats[0]:.6g}, std {stats[1]:.6g}"


def read_base(data: bytes, source: str, version: int | None = None) -> GlobalBase:
    """A base model from the bytes of a ``base_model.pt`` (e.g. as received at the end of a run); ``source`` names it in errors."""
    try:
        raw = torch.load(io.BytesIO(data), weights_only=True)
        config = RunConfig.from_dict(raw["config"], source=source)
        statistics = {k: (float(v[0]), float(v[1])) for k, v in (raw.get("normalization") or {}).items()}
        return GlobalBase(unflatten_state(raw["state"]), config, int(raw["round"]), data, source, version, raw.get("privacy"), statistics or None,
                          raw.get("lineage"))
    except Exception as e:
        raise PersonalizationError(f"{source} is not a fedmeta base model: {e}") from None


def load_base(source: str | Path, home: SiteHome | None = None) -> GlobalBase:
    """A base model from a run folder, a ``base_model.pt`` file, or a registry version (``v3``)."""
    path = Path(source)
    if path.is_dir():
        path = path / BASE_FILE
        if not path.exists():
            raise PersonalizationError(f"{source} has no {BASE_FILE}: is it a finished training run folder?")
    if path.is_file():
        return read_base(path.read_bytes(), str(path))
    try:
        number = parse_version(str(source))
    except RegistryError:
        raise PersonalizationError(f"base model {source!r} is neither a run folder, a {BASE_FILE} file, nor a registry version like v3") from None
    if home is None:
        raise PersonalizationError(f"base model {source!r} is a registry version; give the site home that holds it")
    version = home.registry.get(number)
    if version.kind != "base":
        raise PersonalizationError(f"{version.label} is a {version.kind} model of site {version.site!r}, not a global base model")
    _, data = home.load(version, BASE_FILE)
    return read_base(data, f"{home.path} {version.label}", version.version)


def register_base(home: SiteHome, base: GlobalBase, actor: str | None = None, delivery: dict | None = None, parent: ModelVersion | None = None) -> ModelVersion:
    """Record the base in the registry (once: a known hash returns the existing version).

    ``delivery`` is how the base reached the site when a run sent it
    (:mod:`fedmeta.fl.delivery`: run, round, configuration digest, ...): it
    goes into the manifest's ``training``, whose hash the registry records.

    A regional base (:attr:`GlobalBase.lineage` set) is registered as a base
    version of its own whose ``parent`` is the global base's version, with its
    lineage in ``training`` and its own privacy account. Of the region's sites
    only their number is kept: their names are the coordinator's knowledge.
    """
    if base.version is not None:
        return home.registry.get(base.version)
    if base.lineage is not None and parent is None:
        raise PersonalizationError(f"{base.source} is region {base.lineage.get('region')!r}'s base: register the global base first and pass it as parent")
    manifest = Manifest(
        kind="base",
        model_file=BASE_FILE,
        sha256="",
        files={},
        run_id=base.run_id,
        training={"algorithm": base.config.algorithm.model_dump(mode="json"), "round": base.round, "hidden": list(base.hidden), "source": base.source,
                  **({"delivery": delivery} if delivery else {}), **regional_training(base.lineage)},
        privacy=base.privacy,
    )
    version, _ = home.store({BASE_FILE: base.data}, manifest, parent=None if parent is None else parent.version, actor=actor)
    base.version = version.version
    return version


def regional_training(lineage: dict | None) -> dict:
    """What a regional base's manifest records of its lineage (nothing for the global base): level, region, global round and hash, rounds, site count."""
    if not lineage:
        return {}
    return {"level": lineage.get("level", "region"), "region": lineage.get("region"), "global_round": lineage.get("global_round"),
            "global_sha256": lineage.get("global_sha256"), "regional_rounds": lineage.get("regional_rounds"), "sites": len(lineage.get("sites") or [])}
