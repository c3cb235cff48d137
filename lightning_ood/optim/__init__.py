"""Optimiser plumbing shared by every method: injected optimiser / scheduler callables and run-length schedules."""

from lightning_ood.optim.configure import configure_optimizers, schedule_length
from lightning_ood.optim.schedules import WarmupOneCycleLR, with_total_steps

__all__ = ["WarmupOneCycleLR", "configure_optimizers", "schedule_length", "with_total_steps"]
