"""Scoring rows with a site's promoted model, from Python in one call (and behind ``fedmeta predict``).

The model is the ONNX file the server would load, read through the registry
(so its bytes are checked against the hash recorded at registration) and run
with onnxruntime, one thread. Rows are checked against the model's schema
first, with errors that name the source, column and row, never the value.

Example, in a folder holding a site home (``site-home``, as ``fedmeta
personalize`` creates it) whose site ``clinic_003`` has a promoted model::

    >>> import pandas as pd
    >>> import fedmeta.predict
    >>> rows = pd.read_csv("clinics/clinic_003/test.csv")                       # doctest: +SKIP
    >>> predictions = fedmeta.predict.predict(rows, site_home="site-home", site="clinic_003")  # doctest: +SKIP
    >>> list(predictions.columns)                                              # doctest: +SKIP
    ['readmission', 'readmission.p_0', 'readmission.p_1', 'mortality', 'mortality.p_0', 'mortality.p_1', 'outside_training_range']

One output row per input row: for each classification task the predicted
class and one probability column per class (``<task>.p_<class>``), for
each regression task the value in label units, and last
``outside_training_range``: the numeric features, ``;``-separated, whose
value lies outside the range the model was trained on (empty when none;
the column is absent for a model that records no range). Such rows are
scored all the same (:mod:`fedmeta.training_range`). Columns other than the
model's features (labels, identifiers) are ignored. A model personalized
with a site's ``mapping.json`` recorded it, and rows are read through it:
in the site's own columns, codes and units, or already in the schema's. To score many frames,
load once with :func:`load_promoted` and call :meth:`PromotedModel.predict`.
(``tests/test_predict_api.py`` runs the example above on a real site home.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.mapping import Mapping, mapped_frame
from fedmeta.data.schema import Schema, SchemaError
from fedmeta.manifest import TaskOutput
from fedmeta.registry import ModelVersion, SiteHome
from fedmeta.training_range import RangeCheck


@dataclass
class PromotedModel:
    """A site's promoted model, verified and ready to score: its version, schema, tasks and onnxruntime session."""

    version: ModelVersion
    schema: Schema
    tasks: list[TaskOutput]
    session: object = field(repr=False)
    ranges: RangeCheck | None = None
    mapping: Mapping | None = None

    def predict(self, rows: pd.DataFrame, source: str = "rows") -> pd.DataFrame:
        """Predictions for every row of ``rows`` (see the module docstring for the columns); ``source`` names the rows in errors."""
        if rows.empty:
            raise SchemaError(f"{source}: no rows to score")
        rows = mapped_frame(self.mapping, rows, self.schema, source, need_labels=False)
        self.schema.validate_frame(rows, source)
        feed = {}
        for feature in self.schema.features:
            column = rows[feature.name]
            if feature.type == "numeric":
                feed[feature.name] = pd.to_numeric(column).to_numpy(np.float32)
            else:
                feed[feature.name] = column.astype(str).to_numpy(object)
        outputs = self.session.run([t.name for t in self.tasks], feed)
        result = pd.DataFrame(index=rows.index)
        for task, values in zip(self.tasks, outputs):
            if task.kind == "regression":
                result[task.name] = np.asarray(values).reshape(len(rows))
                continue
            classes = task.classes or [str(i) for i in range(values.shape[1])]
            result[task.name] = [classes[i] for i in values.argmax(1)]
            for j, name in enumerate(classes):
                result[f"{task.name}.p_{name}"] = values[:, j]
        if self.ranges is not None:
            flagged = [""] * len(rows)
            for row in self.ranges.flagged(feed, len(rows)):
                flagged[row["row"]] = ";".join(row["features"])
            result["outside_training_range"] = flagged
        return result


def load_promoted(site_home: str | Path | None = None, site: str | None = None) -> PromotedModel:
    """The promoted model of ``site`` (default: the only site) in ``site_home`` (default ``$FEDMETA_SITE_HOME`` or ``./site-home``).

    Raises :class:`~fedmeta.registry.RegistryError` for a missing site home or
    site, and :class:`~fedmeta.manifest.ManifestError` when the model's bytes
    differ from what the registry recorded.
    """
    import onnxruntime as ort

    home = SiteHome.existing(Path(site_home) if site_home is not None else None)
    version = home.current(site)
    manifest, onnx_bytes = home.load(version)  # bytes checked against the registry's record
    if manifest.schema_ is None:
        raise SchemaError(f"{version.label} has no schema in its manifest: it cannot score rows")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    schema = Schema.model_validate(manifest.schema_)
    ranges = RangeCheck.from_manifest(manifest.feature_ranges, [f.name for f in schema.features if f.type == "numeric"])
    mapping = None
    if manifest.mapping is not None:
        # Checked against the schema's digest when the model was trained; a head since added changes the schema, not the site's columns.
        mapping = Mapping.model_validate(manifest.mapping).model_copy(update={"schema_digest": None})
    return PromotedModel(version, schema, list(manifest.tasks), session, ranges, mapping)


def predict(rows: pd.DataFrame, site_home: str | Path | None = None, site: str | None = None) -> pd.DataFrame:
    """Score a DataFrame with a site's promoted model in one call: :func:`load_promoted` then :meth:`PromotedModel.predict`."""
    return load_promoted(site_home, site).predict(rows)
