"""Options and defaults shared by the commands that read a site home."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

SITE_HOME_OPTION = typer.Option(None, "--site-home", envvar="FEDMETA_SITE_HOME", help="The site's home folder (registry + models). Default ./site-home.")


class Algorithm(str, Enum):
    """The meta-learning algorithms fedmeta trains with (``--algorithm``)."""

    reptile = "reptile"
    fomaml = "fomaml"
    maml = "maml"
    metasgd = "metasgd"
    anil = "anil"


def default_site_home() -> Path:
    from fedmeta.registry import default_site_home as default

    return default()


def open_home(site_home: Path | None):
    """An existing site home: commands that only read one refuse a missing folder instead of creating an empty registry."""
    from fedmeta.registry import SiteHome

    return SiteHome.existing(site_home)
