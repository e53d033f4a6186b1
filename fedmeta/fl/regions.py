"""Regions: which region each site declares, which regions get a regional base, and where a run keeps them.

A site declares its region at the roll call (:data:`REGION` in the reply's
site record): from its region folder or ``regions.csv``
(:mod:`fedmeta.data.federation`) in simulation, from its SuperNode's
``region`` node config on the Deployment Engine. The coordinator trusts the
declaration as it trusts the site's name: a site can join only one region
per run, and each region's rounds keep the run's protections (robust rules,
DP) within it.

A run with regions writes ``regions.json`` and one run folder per trained
region, ``regions/<region>/`` (its ``base_model.pt`` is the regional base,
its ``metrics.jsonl`` the regional rounds): the plan of
:func:`plan_regions` with each region's outcome.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmeta.data.federation import check_region_name
from fedmeta.data.schema import SchemaError
from fedmeta.files import atomic_write_text

log = logging.getLogger("flwr.fedmeta")

#: The roll-call reply's key for a site's declared region.
REGION = "region"
REGIONS_FILE = "regions.json"
REGIONS_FOLDER = "regions"


def declared_region(site: str, value) -> str | None:
    """The region ``site`` declared, or None when it declared none; a malformed name is logged in one line and ignored."""
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, str):
            raise SchemaError(f"roll call: region {repr(value)[:40]} is not a name")
        return check_region_name(value[:100], "roll call")  # the same rule as a region folder's (fedmeta.data.federation)
    except SchemaError as e:
        log.warning("site %s: %s; it trains at the global level only", site, e)
        return None


@dataclass
class Region:
    """One region of a run: its sites, whether it gets its own base, and why not."""

    sites: list[str]
    trained: bool = False
    note: str = ""
    rounds: int = 0  # regional rounds aggregated
    privacy: dict | None = None
    extra: dict = field(default_factory=dict)


def plan_regions(site_regions: dict[str, str], connected: set[str], min_sites: int) -> dict[str, Region]:
    """Each declared region with its connected sites; a region with fewer than ``min_sites`` keeps the global base, with the reason."""
    by_region: dict[str, list[str]] = {}
    for site, region in site_regions.items():
        if site in connected:
            by_region.setdefault(region, []).append(site)
    plan = {}
    for name in sorted(by_region):
        sites = sorted(by_region[name])
        region = Region(sites)
        if len(sites) < min_sites:
            region.note = f"kept the global base: {len(sites)} site(s), fewer than regions.min_sites = {min_sites}"
        plan[name] = region
    return plan


def region_dir(run_dir: str | Path, region: str) -> Path:
    return Path(run_dir) / REGIONS_FOLDER / region


def save_regions(run_dir: str | Path, global_round: int, plan: dict[str, Region], complete: bool = True) -> None:
    """``regions.json``: every region, its sites, and whether it has a base of its own; ``complete`` once the regional stage has ended.

    Written after each region too (``complete`` false), so that a resumed run keeps the regions already trained.
    """
    payload = {"global_round": global_round, "complete": complete,
               "regions": {name: {k: v for k, v in asdict(r).items() if k != "extra"} | r.extra for name, r in plan.items()}}
    atomic_write_text(Path(run_dir) / REGIONS_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_regions(run_dir: str | Path) -> dict | None:
    """``regions.json`` of a run folder, or None when the run has no regional stage on record."""
    path = Path(run_dir) / REGIONS_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def regional_base_path(run_dir: str | Path, region: str) -> Path | None:
    """The regional base of ``region`` in a run folder, or None when the region kept the global base (or is unknown)."""
    regions = load_regions(run_dir) or {"regions": {}}
    entry = regions["regions"].get(region)
    if not entry or not entry.get("trained"):
        return None
    return region_dir(run_dir, region) / "base_model.pt"


def region_of_site(run_dir: str | Path, site: str) -> str | None:
    """The region ``site`` trained in, by the run's ``regions.json``; None when it declared none."""
    regions = load_regions(run_dir) or {"regions": {}}
    return next((name for name, entry in regions["regions"].items() if site in entry["sites"]), None)


#: Where a region's validation bases live: ``regions/<region>/without/<site>/`` (:mod:`fedmeta.fl.regional_rounds`).
WITHOUT = "without"


def validation_base_path(run_dir: str | Path, region: str, site: str) -> Path | None:
    """The base of ``region`` trained without ``site`` (``[regions] validation_bases``), or None when the run has none."""
    path = region_dir(run_dir, region) / WITHOUT / site / "base_model.pt"
    return path if path.is_file() else None
