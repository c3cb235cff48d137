"""Scores in float32 or better whatever the trainer's precision (``bf16-mixed``, ``16-mixed``, ``bf16-true``).

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


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` as float32 when it is float16 / bfloat16; any other dtype unchanged."""
    return t.float() if t.dtype in _LOW else t


def promote_outputs(out: ModelOutputs) -> ModelOutputs:
    """Every floating tensor of a forward pass in float32 or better."""
    extras = {k: at_least_float32(v) for k, v in out.extras.items()} if out.extras is not None else None
    return ModelOutputs(
        logits=at_least_float32(out.logits) if out.logits is not None else None,
        features=at_least_float32(out.features) if out.features is not None else None,
        extras=extras,
    )


def promote_head(head: nn.Linear | None) -> nn.Linear | None:
    """The head itself, or a float32 copy when its weights are half precision (``*-true`` precision)."""
    if head is None or head.weight.dtype not in _LOW:
        return head
    return copy.deepcopy(head).float()


def full_precision(device: torch.device) -> AbstractContextManager:
    """A context in which autocast is off on ``device`` (operations run in their inputs' dtypes)."""
    return torch.autocast(device_type=device.type, enabled=False)
