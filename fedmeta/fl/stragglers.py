"""Rehearsed slow sites: how long a site waits before it replies to a training message (``[stragglers]``).

A site's wait depends only on the run seed and its name, so the same site is
as slow in every round, on a resumed run, and on both engines (a SuperNode
reads the setting from the run configuration every message carries). The
wait follows the site's real training, so a slow site is slow on top of
what its rows cost.
"""

from __future__ import annotations

import hashlib
import math
import random
import time

from fedmeta.fl.config import RunConfig


def site_delay(config: RunConfig, site: str) -> float:
    """Seconds ``site`` waits: its listed value, else the median delay times a lognormal factor of spread sigma."""
    s = config.stragglers
    if site in s.sites:
        return float(s.sites[site])
    if s.delay <= 0:
        return 0.0
    # A hash, not hash(): Python salts str hashes per process, and every site process must agree.
    key = hashlib.sha256(f"{config.seed}/{site}".encode()).digest()
    z = random.Random(key).gauss(0.0, 1.0)
    return s.delay * math.exp(s.sigma * z)


def wait_as_configured(config: RunConfig, site: str) -> None:
    """Sleep for this site's rehearsed delay (nothing when ``[stragglers]`` is not set)."""
    seconds = site_delay(config, site)
    if seconds > 0:
        time.sleep(seconds)
