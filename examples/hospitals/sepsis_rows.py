"""Write sepsis_rows.csv: a department's labelled rows for ``fedmeta heads add --task sepsis``.

The rows are the admissions of hospital_003 in the federation that
``fedmeta synth hospitals data/hospitals --sites 10`` writes (seed 0): the
schema's 12 feature columns with raw values, plus a ``sepsis`` label (1 or 0)
derived from them by criteria loosely after SIRS and qSOFA: at least two of
heart rate above 90, white cells above 12 or below 4 (10^9/L), systolic blood
pressure at most 110 and creatinine at least 1.6 (mg/dL); 37 of the 295 rows
are positive. The label is a function of the features, so a head can learn
it; the rule is illustrative, not a clinical definition.
The same command always writes the same file.

    python examples/hospitals/sepsis_rows.py [OUT]    # default: examples/hospitals/sepsis_rows.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from fedmeta.data.synthetic import hospital_federation_frames, hospital_schema

SITE, N_SITES, SEED = "hospital_003", 10, 0


def sepsis_label(rows: pd.DataFrame) -> pd.Series:
    """1 where at least two sepsis-like criteria hold, else 0."""
    criteria = (
        (rows["heart_rate"] > 90).astype(int)
        + ((rows["wbc"] > 12) | (rows["wbc"] < 4)).astype(int)
        + (rows["systolic_bp"] <= 110).astype(int)
        + (rows["creatinine"] >= 1.6).astype(int)
    )
    return (criteria >= 2).astype(int)


def sepsis_rows() -> pd.DataFrame:
    """The site's feature columns, in schema order, plus the ``sepsis`` label."""
    _, frames = hospital_federation_frames(n_sites=N_SITES, seed=SEED)
    features = [f.name for f in hospital_schema().features]
    rows = frames[SITE][features].copy()
    rows["sepsis"] = sepsis_label(rows)
    return rows


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("sepsis_rows.csv")
    rows = sepsis_rows()
    rows.to_csv(out, index=False)
    print(f"wrote {out}: {len(rows)} rows, {int(rows['sepsis'].sum())} with sepsis")


if __name__ == "__main__":
    main()
