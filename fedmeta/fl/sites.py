"""Which sites a simulation runs, and the driver's check of them before any round.

A CSV federation's sites are those :func:`fedmeta.data.federation.discover_sites`
finds in ``federation.data_dir``, sorted by name: partition i of the
simulation is the i-th of them, in every process (Ray workers call
:func:`csv_site` with their partition number). The driver calls
:func:`prepare_federation` first: it settles ``federation.n_sites`` (the number
found, or a one-line error if the configuration says otherwise) and reads and
validates every site's files, so a bad file is one line naming it before the
simulation starts, not an error inside a worker.
"""

from __future__ import annotations

from functools import lru_cache
from fedmeta.data.federation import SiteFiles, check_columns, discover_sites, federation_schema, load_federation_site, under_review
from fedmeta.data.schema import Schema, SchemaError, SchemaProblems
from fedmeta.data.site import SiteData
from fedmeta.fl.config import ConfigError, RunConfig
from fedmeta.fl.normalization import applied


@lru_cache(maxsize=8)
def _sites(data_dir: str) -> tuple[SiteFiles, ...]:
    return tuple(discover_sites(data_dir))


@lru_cache(maxsize=8)
def _schema(data_dir: str) -> Schema:
    return federation_schema(data_dir)


@lru_cache(maxsize=32)
def _load(site: SiteFiles, data_dir: str, test_fraction: float, seed: int, statistics: str | None) -> SiteData:
    return load_federation_site(site, applied(_schema(data_dir), statistics), test_fraction, seed)


def csv_site_files(config: RunConfig, partition: int) -> SiteFiles:
    """The files of partition ``partition`` of a CSV federation: the i-th site found, sorted by name."""
    sites = _sites(config.federation.data_dir)
    if not 0 <= partition < len(sites):
        raise ValueError(f"partition {partition} has no site in {config.federation.data_dir} ({len(sites)} sites)")
    return sites[partition]


def csv_site(config: RunConfig, partition: int, statistics: str | None = None) -> SiteData:
    """The rows of partition ``partition`` of a CSV federation: the i-th site found, sorted by name,
    normalized with the federation's ``statistics`` (JSON, :mod:`fedmeta.fl.normalization`) if given."""
    fed = config.federation
    return _load(csv_site_files(config, partition), fed.data_dir, fed.test_fraction, fed.seed, statistics)


def prepare_federation(config: RunConfig, accept_review: bool = False) -> tuple[RunConfig, list[SiteData]]:
    """``config`` with ``federation.n_sites`` settled, and every site loaded and checked (CSV federations).

    Raises :class:`~fedmeta.fl.config.ConfigError` when ``n_sites`` disagrees
    with the sites found; :class:`~fedmeta.data.schema.SchemaProblems` naming
    every file that lacks a feature or a label column its site needs
    (:func:`~fedmeta.data.federation.check_columns`), or each site whose
    ``mapping.json`` has columns under review, unless ``accept_review``
    (:func:`~fedmeta.data.federation.under_review`); and
    :class:`~fedmeta.data.schema.SchemaError` for the first unreadable file,
    row that does not fit the schema, or site with no task to train; each a
    single line naming the folder, file or site.
    Synthetic federations are returned unchanged with no sites.
    """
    fed = config.federation
    if fed.kind != "csv":
        return config, []
    found = discover_sites(fed.data_dir)
    if fed.n_sites is not None and fed.n_sites != len(found):
        raise ConfigError(
            f"federation.n_sites = {fed.n_sites} but {fed.data_dir} holds {len(found)} site(s); "
            "remove n_sites to train every site found, or fix the folder"
        )
    if config.server.min_sites > len(found):
        raise ConfigError(f"{fed.data_dir} holds {len(found)} site(s), fewer than server.min_sites = {config.server.min_sites}")
    schema = federation_schema(fed.data_dir)
    pending = under_review(found)
    if pending and not accept_review:
        raise SchemaProblems([f"{line}; check them and set \"review\": false, or pass --accept-review" for line in pending])
    check_columns(found, schema)
    sites = []
    for site_files in found:
        site = load_federation_site(site_files, schema, fed.test_fraction, fed.seed)
        if not site.tasks:
            where = f"{site_files.train}" + (f" and {site_files.test}" if site_files.test else "")
            raise SchemaError(
                f"site {site.name!r} ({where}): no task has enough labelled rows "
                "(each needs >= 4 training and >= 2 held-out or test rows)"
            )
        sites.append(site)
    data = config.model_dump(mode="json")
    data["federation"]["n_sites"] = len(found)
    return RunConfig.from_dict(data, source=f"{fed.data_dir} ({len(found)} sites)"), sites
