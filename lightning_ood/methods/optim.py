"""Injected optimiser and scheduler -> Lightning's ``configure_optimizers`` value; the shared supervised step."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ood.methods.schedules import with_total_steps


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
    """Build the optimiser over ``module``'s parameters and the scheduler (stepped per ``interval``).

    A scheduler built with ``total_steps=None`` (e.g. :class:`~lightning_ood.methods.schedules.WarmupOneCycleLR`)
    gets the run's length from the trainer; a length set in the config is never replaced.
    """
    if interval not in ("epoch", "step"):
        raise ValueError(f"model.scheduler_interval must be 'epoch' or 'step', got {interval!r}")
    opt = optimizer(module.parameters())
    if scheduler is None:
        return opt
    build = with_total_steps(scheduler, lambda: schedule_length(module.trainer, interval))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": build(opt), "interval": interval}}


def cross_entropy_step(
    module: LightningModule, logits: Tensor, targets: Tensor, stage: str, label_smoothing: float = 0.0
) -> Tensor:
    """Cross-entropy on the ID classes, logging ``<stage>/loss`` and ``<stage>/acc`` (epoch means, synced)."""
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    acc = (logits.argmax(dim=1) == targets).float().mean()
    on_step = stage == "train"
    n = len(targets)
    module.log(
        f"{stage}/loss",
        loss,
        on_step=on_step,
        on_epoch=True,
        prog_bar=True,
        sync_dist=not on_step,
        batch_size=n,
    )
    module.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
    return loss
