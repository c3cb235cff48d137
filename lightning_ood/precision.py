"""Scores in float32 or better whatever the trainer's precision, and never a downcast of float64.

The forward pass may run in reduced precision; detectors and native scores then run outside autocast on the
pass's outputs promoted to float32 (float64 stays float64), with a float32 copy of a half-precision head.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from lightning_ood.contract import ModelOutputs

_LOW = (torch.float16, torch.bfloat16)


def at_least_float32_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is a float of 32 bits or more (float32, float64), else float32 (half, bfloat16, ints)."""
    if dtype.is_floating_point and torch.finfo(dtype).bits >= 32:
        return dtype
    return torch.float32


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` promoted to float32 when it is half / bfloat16 (or integer); float32 and float64 unchanged."""
    return tensor.to(at_least_float32_dtype(tensor.dtype))


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The widest of the tensors' dtypes, at least float32 (``None`` entries are skipped)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, at_least_float32_dtype(tensor.dtype))
    return dtype


def _promote(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _LOW else t  # integer products (masks, indices) stay as they are


def promote_outputs(out: ModelOutputs) -> ModelOutputs:
    """Every floating tensor of a forward pass in float32 or better."""
    extras = {k: _promote(v) for k, v in out.extras.items()} if out.extras is not None else None
    return ModelOutputs(
        logits=_promote(out.logits) if out.logits is not None else None,
        features=_promote(out.features) if out.features is not None else None,
        extras=extras,
        feature_maps=tuple(_promote(m) for m in out.feature_maps) if out.feature_maps is not None else None,
    )


def promote_head(head: nn.Linear | None) -> nn.Linear | None:
    """The head itself, or a float32 copy when its weights are half precision (``*-true`` precision)."""
    if head is None or head.weight.dtype not in _LOW:
        return head
    return copy.deepcopy(head).float()


def full_precision(device: torch.device) -> AbstractContextManager:
    """A context in which autocast is off on ``device`` (operations run in their inputs' dtypes)."""
    return torch.autocast(device_type=device.type, enabled=False)
