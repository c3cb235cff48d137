"""Injected optimiser and scheduler -> Lightning's ``configure_optimizers`` return value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn


def configure_optimizers(
    params: Iterable[nn.Parameter],
    optimizer: OptimizerCallable,
    scheduler: LRSchedulerCallable | None,
    interval: Literal["epoch", "step"],
) -> Any:
    """Build the optimiser (and scheduler, stepped per ``interval``) from the callables the config injected."""
    if interval not in ("epoch", "step"):
        raise ValueError(f"model.scheduler_interval must be 'epoch' or 'step', got {interval!r}")
    opt = optimizer(params)
    if scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": interval}}
