"""Options and defaults shared by the commands that read a site home, and the site mapping that commands reading a site's rows pick up."""

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


def read_site_mapping(data: Path, mapping: Path | None, accept_review: bool):
    """The mapping a command reads ``data`` through, and the columns accepted without review (for the audit log).

    ``--mapping FILE`` if given, else the one beside ``data``
    (:func:`~fedmeta.data.site.mapping_beside`), else none. A mapping with
    columns under review is refused in one line naming the file and the
    columns unless ``accept_review``; each column so accepted is listed on
    stderr, so the person who accepted sees what they accepted.
    """
    from fedmeta.cli.output import console_err
    from fedmeta.data.mapping import Mapping, require_reviewed
    from fedmeta.data.site import mapping_beside

    mapping = mapping or mapping_beside(data)
    if mapping is None:
        return None, []
    loaded = Mapping.load(mapping)
    accepted = require_reviewed(loaded, str(mapping), accept_review)
    for line in accepted:
        console_err.print(f"accepted without review (--accept-review): {mapping}: {line}", soft_wrap=True, highlight=False)
    return loaded, accepted
