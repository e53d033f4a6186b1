"""Schema harmonization at a site: a site's own column names, codes and units matched to the federation schema.

- :mod:`~fedmeta.data.harmonize.vocabulary`: names as concept words (abbreviations, other languages)
- :mod:`~fedmeta.data.harmonize.units`: conversions and the evidence for a column's unit
- :mod:`~fedmeta.data.harmonize.categories`: site values to schema values
- :mod:`~fedmeta.data.harmonize.profile`: what matching reads from a column (it stays at the site)
- :mod:`~fedmeta.data.harmonize.match`: the assignment, confidences and review flags, as a
  :class:`~fedmeta.data.mapping.Mapping` (``mapping.json``)
"""

from fedmeta.data.harmonize.match import MatchResult, match_frame

__all__ = ["MatchResult", "match_frame"]
