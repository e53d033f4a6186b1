"""A site's regional base: which region's base a personalization starts from, read from a run folder or the registry.

A run with regions (:mod:`fedmeta.fl.regions`) writes ``regions.json`` and one
base per trained region. :func:`load_regional_base` picks the base of the
region asked for (``--region``, for an unseen site of a known region) or of the
region the site trained in, and says in a note when there is none to use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedmeta.fl.regions import REGIONS_FILE, load_regions, region_of_site, regional_base_path, validation_base_path
from fedmeta.personalize.base import BASE_FILE, GlobalBase, PersonalizationError, read_base
from fedmeta.registry import RegistryError, SiteHome, parse_version

#: ``--region none``: personalize from the global base only.
NO_REGION = "none"


def _run_folder(source: str | Path) -> Path | None:
    """The run folder ``source`` names (the folder itself, or a ``base_model.pt`` directly inside one)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.is_file() and path.name == BASE_FILE:
        return path.parent
    return None


def load_regional_base(
    source: str | Path, site_name: str, region: str | None = None, home: SiteHome | None = None, note: Callable[[str], None] | None = None
) -> GlobalBase | None:
    """The regional base ``site_name`` personalizes from, or None to start from the global base alone.

    ``source`` is what ``--base`` named. A run folder (or its ``base_model.pt``)
    with ``regions.json`` gives the base of ``region`` if given, else of the
    region the site trained in. A registry version of the global base gives the
    registered base of ``region`` whose parent it is (a registry knows no
    site's region). None when ``region`` is :data:`NO_REGION`, the site trained
    in no region, the region kept the global base (``note`` is told why), or the
    run had no regions. A ``region`` the run does not know is refused, naming
    the ones it does.
    """
    if region == NO_REGION:
        return None
    folder = _run_folder(source)
    if folder is None:
        return _registered(source, region, home)
    regions = load_regions(folder)
    if regions is None:
        if region is not None:
            raise PersonalizationError(f"--region {region}: run folder {folder} has no regions ({REGIONS_FILE} not found); drop --region")
        return None
    known = regions.get("regions", {})
    if region is None:
        region = region_of_site(folder, site_name)
        if region is None:
            return None
    elif region not in known:
        raise PersonalizationError(f"--region {region}: not a region of run {folder} (its regions: {', '.join(sorted(known)) or 'none'})")
    path = regional_base_path(folder, region)
    if path is None:
        if note is not None:
            note(f"region {region} {known[region].get('note') or 'kept the global base'}: personalizing from the global base")
        return None
    if not path.is_file():
        raise PersonalizationError(f"{path}: region {region}'s base is missing, though {folder / REGIONS_FILE} says it was trained")
    return read_base(path.read_bytes(), str(path))


def load_validation_base(source: str | Path, site_name: str, region: str) -> GlobalBase | None:
    """The base of ``region`` trained without ``site_name`` (``[regions] validation_bases``), when ``source`` is a run folder that has one."""
    folder = _run_folder(source)
    path = validation_base_path(folder, region, site_name) if folder is not None else None
    return None if path is None else read_base(path.read_bytes(), str(path))


def _registered(source: str | Path, region: str | None, home: SiteHome | None) -> GlobalBase | None:
    """The registered base of ``region`` whose parent is the global base version ``source``."""
    if region is None or home is None:
        return None
    try:
        parent = parse_version(str(source))
    except RegistryError:
        return None
    found = {}
    for v in home.registry.versions(kind="base"):
        if v.parent == parent and v.lineage.get("region"):
            found[v.lineage["region"]] = v  # versions come oldest first: the newest of a region wins
    if region not in found:
        raise PersonalizationError(f"--region {region}: no regional base registered under v{parent} (registered regions: {', '.join(sorted(found)) or 'none'})")
    version = found[region]
    _, data = home.load(version, BASE_FILE)
    return read_base(data, f"{home.path} {version.label}", version.version)
