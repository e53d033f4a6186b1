"""The model registry: versions, lineage, the promoted version per site, and a tamper-evident audit log.

- :mod:`~fedmeta.registry.interface`: :class:`Registry`, :class:`ModelVersion`, :class:`AuditEntry`, version labels;
- :mod:`~fedmeta.registry.chain`: the audit log's hash chain: hashing, walking, anchoring to a recorded head, migration;
- :mod:`~fedmeta.registry.sqlite`: :class:`SQLiteRegistry`, one SQLite file with a hash-chained audit log;
- :mod:`~fedmeta.registry.site_home`: :class:`SiteHome`, a site's folder of model versions, loaded only
  after their bytes match the hashes recorded at registration.

Promotion is per site; rollback returns a site to the version promoted before
the current one, and repeated rollbacks keep walking back.
"""

from fedmeta.registry.interface import (
    AuditChainError, AuditEntry, AuditVerification, ChainHead, ModelVersion, Registry, RegistryError, current_user, parse_version,
)
from fedmeta.registry.site_home import REGISTRY_FILE, SITE_HOME_ENV, SiteHome, default_site_home
from fedmeta.registry.sqlite import GENESIS, SQLiteRegistry

__all__ = [
    "GENESIS", "REGISTRY_FILE", "SITE_HOME_ENV", "AuditChainError", "AuditEntry", "AuditVerification", "ChainHead", "ModelVersion", "Registry", "RegistryError",
    "SQLiteRegistry", "SiteHome", "current_user", "default_site_home", "parse_version",
]
