"""Site personalization: the global base model adapted at a site, new task heads, and publishing.

One module per concept:

- :mod:`~fedmeta.personalize.base`: :func:`load_base` reads a global base model
  from a training run folder (``base_model.pt``) or from the registry;
  :func:`register_base` records it.
- :mod:`~fedmeta.personalize.regional`: :func:`load_regional_base` picks the
  regional base a site starts from (its own region's, or ``--region``'s).
- :mod:`~fedmeta.personalize.adaptation`: :func:`personalize` fine-tunes the
  base on K shots per task drawn from the site's training rows and scores
  base and personalized models on the site's held-out (or test) rows.
- :mod:`~fedmeta.personalize.all_rows`: ``shots="all"``, fine-tuning on every
  labelled training row, with the steps and early stopping chosen on a
  validation part of those rows.
- :mod:`~fedmeta.personalize.candidates`: the ways a site can adapt the base
  (unadapted, few shots, all rows, Ditto's proximal fine-tune, heads on the
  frozen body, APFL's mix of base and local predictions).
- :mod:`~fedmeta.personalize.choice`: :func:`choose_personalization`, the
  default: per site, the candidate with the best score on validation rows
  split from its training rows, refit on all of them.
- :mod:`~fedmeta.personalize.heads`: :func:`train_head` fits a head for a
  department's task (known to the federation or brand new) on a few
  labelled rows, ANIL-style.
- :mod:`~fedmeta.personalize.publishing`: :func:`publish` exports a model to
  ONNX, writes its manifest and registers it as a new version of the site.

Everything is deterministic for a given seed.
"""

from fedmeta.personalize.adaptation import AUTO_STEPS, MODES, Mode, Personalization, check_shots, personalize, support_sets
from fedmeta.personalize.choice import choose_personalization
from fedmeta.personalize.base import BASE_FILE, GlobalBase, PersonalizationError, load_base, register_base
from fedmeta.personalize.heads import MIN_HOLDOUT_ROWS, HeadResult, head_task, train_head
from fedmeta.personalize.publishing import Published, base_of, data_lineage, load_trained, publish
from fedmeta.personalize.regional import load_regional_base

__all__ = [
    "AUTO_STEPS",
    "BASE_FILE",
    "MIN_HOLDOUT_ROWS",
    "MODES",
    "GlobalBase",
    "HeadResult",
    "Mode",
    "Personalization",
    "PersonalizationError",
    "Published",
    "base_of",
    "check_shots",
    "choose_personalization",
    "data_lineage",
    "head_task",
    "load_base",
    "load_regional_base",
    "load_trained",
    "personalize",
    "publish",
    "register_base",
    "support_sets",
    "train_head",
]
