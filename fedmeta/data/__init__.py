"""Site data: schema, loading and validation, episodes, and seeded synthetic federations."""

from fedmeta.data.episodes import EpisodeBatch, EpisodeSampler
from fedmeta.data.schema import Feature, Schema, SchemaError, TaskColumn, feature_sums
from fedmeta.data.site import SiteData, load_site, read_table, site_name
from fedmeta.data.federation import SiteFiles, discover_sites, federation_schema, load_federation, load_federation_site
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
    "SiteFiles",
    "TaskColumn",
    "discover_sites",
    "feature_sums",
    "federation_schema",
    "fedprox_synthetic",
    "hospital_federation",
    "hospital_federation_frames",
    "hospital_schema",
    "load_federation",
    "load_federation_site",
    "load_site",
    "read_table",
    "site_name",
    "write_hospital_federation",
]
