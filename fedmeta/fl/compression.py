"""Compression of site updates (int8, top-k with error feedback) and of the broadcast model (int8).

A codec packs a flat update ``{key: float32 tensor}`` (keys in sorted order)
into two or three arrays, so per-array framing does not eat the savings and
Flower counts exactly the bytes that travel; the reply names the keys. The
server decodes with the shapes of the global model it sent.

- :class:`Int8Codec`: per tensor, ``round(x / s)`` as int8 with ``s = max|x| / 127``
  (one float32 scale per tensor); 4x smaller, error at most s / 2 per entry.
- :class:`TopKCodec`: per tensor, the ``ratio`` largest-magnitude entries as
  positions plus int8 values: 3 bytes per kept entry with int16 positions
  when every tensor has fewer than 32768 entries, else 5 with int32. The site keeps
  what it did not send as a residual and adds it to its next update (error
  feedback, Seide et al. 2014; Stich et al. 2018): nothing is lost, only delayed.
- :func:`encode_broadcast` / :func:`decode_broadcast`: the global model a site
  receives, int8-quantized like an update, with its keys and shapes in a
  short JSON string. The server keeps full precision; sites start from the
  rounded model, and their updates are taken relative to what they received.

Example::

    >>> import torch
    >>> update = {"params.w": torch.tensor([0.5, -1.27, 0.01, 0.0])}
    >>> codec = TopKCodec(ratio=0.5)
    >>> arrays, residual = codec.encode(update, residual={})
    >>> codec.decode(arrays, ["params.w"], {"params.w": (4,)})["params.w"]
    tensor([ 0.5000, -1.2700,  0.0000,  0.0000])
    >>> residual["params.w"]
    tensor([0.0000, 0.0000, 0.0100, 0.0000])
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence

import torch

FlatState = dict[str, torch.Tensor]


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().max().clamp_min(1e-30) / 127.0 if x.numel() else torch.tensor(1.0)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale.reshape(1).float()


def _sizes(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> list[int]:
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise ValueError(f"compressed update names {missing[:3]}, which the global model does not have")
    return [math.prod(shapes[k]) for k in keys]


def _need(arrays: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"compressed update lacks the arrays {missing}")


class Int8Codec:
    """Symmetric per-tensor int8 quantization; keeps no site state."""

    name = "int8"

    def encode(self, update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]) -> tuple[FlatState, FlatState]:
        parts = [_quantize(update[k].float().reshape(-1)) for k in sorted(update)]
        return {"q": torch.cat([q for q, _ in parts]), "scale": torch.cat([s for _, s in parts])}, {}

    def decode(self, arrays: Mapping[str, torch.Tensor], keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> FlatState:
        _need(arrays, ["q", "scale"])
        sizes = _sizes(keys, shapes)
        if arrays["q"].numel() != sum(sizes) or arrays["scale"].numel() != len(keys):
            raise ValueError(f"int8 update carries {arrays['q'].numel()} values for {sum(sizes)} parameters")
        values = arrays["q"].float().split(sizes)
        return {k: (v * s).reshape(shapes[k]) for k, v, s in zip(keys, values, arrays["scale"].float())}


class TopKCodec:
    """The ``ratio`` largest entries of each tensor (int16/int32 position, int8 value); the rest stays at the site."""

    name = "topk"

    def __init__(self, ratio: float, error_feedback: bool = True):
        if not 0 < ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        self.ratio, self.error_feedback = ratio, error_feedback

    def kept(self, numel: int) -> int:
        return max(1, math.ceil(self.ratio * numel)) if numel else 0

    def encode(self, update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]) -> tuple[FlatState, FlatState]:
        positions, values, scales = [], [], []
        left: FlatState = {}
        small = all(t.numel() <= torch.iinfo(torch.int16).max for t in update.values())
        for key in sorted(update):
            flat = update[key].float().reshape(-1)
            if self.error_feedback and key in residual and residual[key].numel() == flat.numel():
                flat = flat + residual[key].reshape(-1)
            index = flat.abs().topk(self.kept(flat.numel()), sorted=False).indices.sort().values
            q, scale = _quantize(flat[index])
            positions.append(index.to(torch.int16 if small else torch.int32))
            values.append(q)
            scales.append(scale)
            if self.error_feedback:
                sent = torch.zeros_like(flat)
                sent[index] = q.float() * scale
                left[key] = (flat - sent).reshape(update[key].shape)
        return {"idx": torch.cat(positions), "q": torch.cat(values), "scale": torch.cat(scales)}, left

    def decode(self, arrays: Mapping[str, torch.Tensor], keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> FlatState:
        _need(arrays, ["idx", "q", "scale"])
        sizes = _sizes(keys, shapes)
        kept = [self.kept(n) for n in sizes]
        if arrays["idx"].numel() != sum(kept) or arrays["q"].numel() != sum(kept) or arrays["scale"].numel() != len(keys):
            raise ValueError(f"top-k update carries {arrays['idx'].numel()} entries; ratio {self.ratio} of these parameters keeps {sum(kept)}")
        out = {}
        for key, size, index, q, scale in zip(keys, sizes, arrays["idx"].long().split(kept), arrays["q"].float().split(kept), arrays["scale"].float()):
            if index.numel() and (index.min() < 0 or index.max() >= size):
                raise ValueError(f"top-k update for {key!r} has positions outside its {size} entries")
            dense = torch.zeros(size)
            dense[index] = q * scale
            out[key] = dense.reshape(shapes[key])
        return out


def make_codec(kind: str, topk_ratio: float = 0.05, error_feedback: bool = True) -> Int8Codec | TopKCodec | None:
    """The codec for ``compression.upload``; None for ``"none"``."""
    if kind == "none":
        return None
    if kind == "int8":
        return Int8Codec()
    if kind == "topk":
        return TopKCodec(topk_ratio, error_feedback)
    raise ValueError(f"unknown compression {kind!r}; choose none, int8 or topk")


#: The config entry that carries an int8 broadcast's keys and shapes.
BROADCAST_LAYOUT = "broadcast-layout"
#: The arrays of an int8 broadcast, in the order that lists of arrays (SecAgg+'s legacy messages) carry them.
BROADCAST_ARRAYS = ("q", "scale")


def encode_broadcast(state: Mapping[str, torch.Tensor]) -> tuple[FlatState, str]:
    """The int8 arrays that carry ``state`` and the JSON (keys and shapes) that :func:`decode_broadcast` needs.

    >>> import torch
    >>> arrays, layout = encode_broadcast({"params.w": torch.tensor([[0.5, -1.27], [0.01, 0.0]])})
    >>> arrays["q"]
    tensor([  50, -127,    1,    0], dtype=torch.int8)
    >>> decode_broadcast(arrays, layout)["params.w"]
    tensor([[ 0.5000, -1.2700],
            [ 0.0100,  0.0000]])
    """
    arrays, _ = Int8Codec().encode(state, {})
    keys = sorted(state)
    return arrays, json.dumps({"keys": keys, "shapes": [list(state[k].shape) for k in keys]})


def decode_broadcast(arrays: Mapping[str, torch.Tensor], layout: str) -> FlatState:
    """The model :func:`encode_broadcast` packed, as float32 tensors."""
    meta = json.loads(layout)
    keys = meta["keys"]
    return Int8Codec().decode(arrays, keys, {k: tuple(shape) for k, shape in zip(keys, meta["shapes"])})


def keys_digest(keys: Sequence[str]) -> str:
    """A short fingerprint of a packed update's key order: the server knows the keys it sent, so sites need not name them.

    >>> keys_digest(["params.body.w", "params.heads.a.w"]) == keys_digest(["params.body.w", "params.heads.a.w"])
    True
    """
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def dense_bytes(update: Mapping[str, torch.Tensor]) -> int:
    """What ``update`` would take uncompressed (float32)."""
    return sum(4 * t.numel() for t in update.values())
