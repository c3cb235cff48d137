"""Injected optimiser and scheduler -> Lightning's ``configure_optimizers`` value."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_ood.optim.schedules import with_total_steps


def schedule_length(trainer: Trainer, interval: Literal["epoch", "step"]) -> int | float:
    """The run's length in the scheduler's unit: optimiser steps, or epochs for ``interval="epoch"``."""
    if interval == "epoch":
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError("set trainer.max_epochs or model.scheduler.init_args.total_steps (epochs)")
        return trainer.max_epochs
    steps = trainer.estimated_stepping_batches
    if steps == float("inf"):
        raise ValueError("set trainer.max_epochs / max_steps or model.scheduler.init_args.total_steps")
    return steps


def configure_optimizers(
    module: LightningModule,
    optimizer: OptimizerCallable,
    scheduler: LRSchedulerCallable | None,
    interval: Literal["epoch", "step"],
) -> Any:
    """Build the optimiser over ``module``'s trainable parameters and the scheduler (stepped per ``interval``).

    A scheduler built with ``total_steps=None`` (e.g. :class:`~lightning_ood.optim.WarmupOneCycleLR`)
    gets the run's length from the trainer; a length set in the config is never replaced.
    """
    if interval not in ("epoch", "step"):
        raise ValueError(f"model.scheduler_interval must be 'epoch' or 'step', got {interval!r}")
    params = [p for p in module.parameters() if p.requires_grad]  # frozen sub-models are not trained
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no trainable parameters to optimise; a method that trains nothing "
            "is evaluated with evaluate.py, not trained"
        )
    opt = optimizer(params)
    if scheduler is None:
        return opt
    build = with_total_steps(scheduler, lambda: schedule_length(module.trainer, interval))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": build(opt), "interval": interval}}
