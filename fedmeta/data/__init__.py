"""Site data: schema, loading and validation, episodes, and seeded synthetic federations."""

from fedmeta.data.episodes import EpisodeBatch, EpisodeSampler
from fedmeta.data.schema import Feature, Schema, SchemaError, TaskColumn, feature_sums
from fedmeta.data.site import SiteData, load_site, read_table
from fedmeta.data.synthetic import (
    SineTasks,
    fedprox_synthetic,
    hospital_federation,
    hospital_federation_frames,
    hospital_schema,
    write_hospital_federation,
)

__all__ = [
    "EpisodeBatch",
    "EpisodeSampler",
    "Feature",
    "Schema",
    "SchemaError",
    "SineTasks",
    "SiteData",
    "TaskColumn",
    "feature_sums",
    "fedprox_synthetic",
    "hospital_federation",
    "hospital_federation_frames",
    "hospital_schema",
    "load_site",
    "read_table",
    "write_hospital_federation",
]
