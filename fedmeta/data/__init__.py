"""Site data: schema, loading and validation, episodes, and seeded synthetic federations."""

from fedmeta.data.schema import Feature, Schema, SchemaError, TaskColumn, feature_sums
from fedmeta.data.site import SiteData, load_site, read_table, site_name
from fedmeta.data.federation import SiteFiles, discover_sites, federation_schema, load_federation, load_federation_site

# Episodes and synthetic federations need torch: they are imported on first use, so reading and
# checking rows (``fedmeta predict``, the server) works in an install without the training extra.
_NEEDS_TORCH = {
    "EpisodeBatch": "fedmeta.data.episodes",
    "EpisodeSampler": "fedmeta.data.episodes",
    "SineTasks": "fedmeta.data.synthetic",
    "fedprox_synthetic": "fedmeta.data.synthetic",
    "hospital_federation": "fedmeta.data.synthetic",
    "hospital_federation_frames": "fedmeta.data.synthetic",
    "hospital_schema": "fedmeta.data.synthetic",
    "write_hospital_federation": "fedmeta.data.synthetic",
}


def __getattr__(name: str):
    if name in _NEEDS_TORCH:
        import importlib

        return getattr(importlib.import_module(_NEEDS_TORCH[name]), name)
    raise AttributeError(f"module 'fedmeta.data' has no attribute {name!r}")


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
