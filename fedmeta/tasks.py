"""A prediction task (a department's question) and its head's shape, without torch.

It lives apart from :mod:`fedmeta.models` so the schema, ``fedmeta predict``
and the server can describe tasks in an install without the training extra.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

TaskKind = Literal["binary", "multiclass", "regression"]


class TaskSpec(BaseModel):
    """One prediction task (a department's question) and its head's shape.

    >>> TaskSpec(name="mortality", kind="binary").out_features
    2
    """

    name: str = Field(min_length=1)
    kind: TaskKind
    n_classes: int | None = None

    @model_validator(mode="after")
    def _check_classes(self) -> "TaskSpec":
        if self.kind == "binary":
            if self.n_classes not in (None, 2):
                raise ValueError(f"task {self.name!r}: binary tasks have 2 classes, got n_classes={self.n_classes}")
            self.n_classes = 2
        elif self.kind == "multiclass":
            if self.n_classes is None or self.n_classes < 2:
                raise ValueError(f"task {self.name!r}: multiclass tasks need n_classes >= 2, got {self.n_classes}")
        elif self.n_classes is not None:
            raise ValueError(f"task {self.name!r}: regression tasks take no n_classes, got {self.n_classes}")
        return self

    @property
    def is_classification(self) -> bool:
        return self.kind != "regression"

    @property
    def out_features(self) -> int:
        return self.n_classes if self.is_classification else 1
