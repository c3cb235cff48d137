"""Compute dtypes of the detectors: float32 or better, never a downcast of float64."""

from __future__ import annotations

import torch
from torch import Tensor


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
