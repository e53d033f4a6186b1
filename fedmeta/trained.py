"""A trained model together with what it takes to run it: schema, body sizes, weights.

The meta-state alone (a dict of tensors) cannot encode a row or name an
output. :class:`TrainedModel` adds the federation schema (feature encoding,
normalization, tasks) and the body's hidden sizes, and is what
personalization produces, what export consumes and what a model version
stores next to its ONNX file (``state.pt``) so that later head requests can
keep training it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch

from fedmeta.data.schema import Schema
from fedmeta.models import MultiTaskModel


class ModelMismatchError(ValueError):
    """Weights that do not fit the schema they are paired with."""


@dataclass
class TrainedModel:
    """Weights (a meta-state: ``{"params": ..., "inner_lrs": ...}``) plus schema and body sizes.

    >>> from fedmeta.data import hospital_schema
    >>> m = TrainedModel.initial(hospital_schema(), hidden=(8,))
    >>> sorted(m.module().heads)
    ['length_of_stay', 'mortality', 'readmission_30d']
    """

    schema: Schema
    hidden: tuple[int, ...]
    state: dict[str, dict[str, torch.Tensor]]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        expected = {k: tuple(v.shape) for k, v in MultiTaskModel.mlp(self.schema.encoded_dim, self.schema.task_specs, self.hidden).named_parameters()}
        got = {k: tuple(v.shape) for k, v in self.params.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
            raise ModelMismatchError(
                "the weights do not fit the schema "
                f"{self.schema.name!r} ({self.schema.encoded_dim} encoded features, tasks {[t.name for t in self.schema.tasks]}, hidden {list(self.hidden)}): "
                + "; ".join(
                    part
                    for part in (
                        f"missing {missing}" if missing else "",
                        f"unexpected {extra}" if extra else "",
                        f"shape differs for {[f'{k}: {got[k]} vs {expected[k]}' for k in shapes]}" if shapes else "",
                    )
                    if part
                )
            )

    @classmethod
    def initial(cls, schema: Schema, hidden: tuple[int, ...] = (64, 64), seed: int = 0) -> "TrainedModel":
        torch.manual_seed(seed)
        model = MultiTaskModel.mlp(schema.encoded_dim, schema.task_specs, hidden)
        return cls(schema, hidden, {"params": {k: v.detach().clone() for k, v in model.named_parameters()}})

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.state["params"]

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.schema.tasks]

    def module(self) -> MultiTaskModel:
        """A fresh ``MultiTaskModel`` holding these weights."""
        model = MultiTaskModel.mlp(self.schema.encoded_dim, self.schema.task_specs, self.hidden)
        model.load_state_dict(self.params)
        return model.eval()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"schema": self.schema.model_dump(mode="json"), "hidden": list(self.hidden), "state": self.state, "info": self.info}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "model state") -> "TrainedModel":
        try:
            raw = torch.load(io.BytesIO(data), weights_only=True)
            return cls(Schema.model_validate(raw["schema"]), tuple(raw["hidden"]), raw["state"], raw.get("info", {}))
        except ModelMismatchError:
            raise
        except Exception as e:
            raise ModelMismatchError(f"cannot read {source}: {e}") from None
