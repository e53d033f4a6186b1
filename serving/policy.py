"""The site's policy for its prediction server: who may change what is served.

Promotion is the admin's. A department's head request registers a new
version; an admin promotes it. A site that wants departments to promote
their own heads says so in ``SITE_HOME/serving-policy.toml``::

    [heads]
    department_may_promote = true

The file is read when the app is built; without it, the defaults below hold.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

POLICY_FILE = "serving-policy.toml"


class PolicyError(ValueError):
    """A policy file that cannot be read or holds unknown settings."""


class HeadPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    department_may_promote: bool = Field(False, description="a department key may ask for its head to be served at once (promote: true)")


class SitePolicy(BaseModel):
    """The site's policy (defaults: only admins promote).

    >>> SitePolicy().heads.department_may_promote
    False
    """

    model_config = ConfigDict(extra="forbid")

    heads: HeadPolicy = Field(default_factory=HeadPolicy)

    @classmethod
    def load(cls, site_home: str | Path) -> "SitePolicy":
        path = Path(site_home) / POLICY_FILE
        if not path.exists():
            return cls()
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, ValidationError, OSError) as e:
            raise PolicyError(f"{path}: {e}") from None
