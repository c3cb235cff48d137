"""Learning-rate schedules that need the length of the run, and how a method tells them.

:class:`WarmupOneCycleLR` is the schedule of OODformer's released code: ``torch.optim.lr_scheduler.OneCycleLR``
(two phases, cosine annealing, ``pct_start = warmup_steps / total_steps``), stepped per iteration. Unlike
torch's class, its length can be left unset (``total_steps: null``) in the config: the method fills it in when
the trainer builds the optimiser (:func:`with_total_steps`), from ``trainer.estimated_stepping_batches`` when
stepped per iteration, which already accounts for ``max_epochs`` / ``max_steps``, the train loader's length,
``limit_train_batches``, gradient accumulation and the number of devices. A value set in the config is never
replaced.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from lightning.pytorch.cli import LRSchedulerCallable
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


@runtime_checkable
class NeedsTotalSteps(Protocol):
    """A scheduler whose length may be given after construction (``total_steps is None`` until then)."""

    total_steps: int | None

    def set_total_steps(self, total_steps: int) -> None: ...


class WarmupOneCycleLR(LRScheduler):
    """One-cycle learning rate (Smith & Topin, 2019) with its warm-up given in steps; one ``step()`` per iteration.

    The learning rate of ``torch.optim.lr_scheduler.OneCycleLR(max_lr=lr, total_steps=T, pct_start=w / T,
    anneal_strategy="cos", cycle_momentum=False)``, where ``lr`` is the optimiser's configured learning rate:
    with ``a(s, e, p) = e + (s - e) * (1 + cos(pi * p)) / 2`` (cosine from ``s`` to ``e``), ``lr0 = lr /
    div_factor`` and ``lr_min = lr0 / final_div_factor``, step ``t`` has::

        a(lr0, lr, t / (w - 1))                     for t <  w - 1   (warm-up)
        a(lr, lr_min, (t - w + 1) / (T - w))        for t >= w - 1   (clamped at lr_min after T - 1)

    OODformer (Koner et al., BMVC 2021, Sec. 4; ``vit/src/train.py`` of the released code) fine-tunes with
    500 warm-up steps of torch's ``OneCycleLR`` and SGD (momentum 0.9). Torch's default also cycles the momentum
    (0.95 -> 0.85 -> 0.95), which silently replaces the configured 0.9; this class leaves momentum alone.

    Args:
        optimizer: the wrapped optimiser (injected: ``LRSchedulerCallable``); its ``lr`` is the peak rate.
        total_steps: ``T``, optimiser steps of the whole run; ``None``: set later by the method
            (:func:`with_total_steps`) from the trainer. Needed from step ``w - 1`` on.
        warmup_steps: ``w >= 0``; 0 or 1 starts at the peak (no warm-up).
        div_factor: the first learning rate is ``lr / div_factor`` (torch's default 25).
        final_div_factor: the last is ``lr / (div_factor * final_div_factor)`` (torch's default 1e4).
        last_epoch: the index of the last step, for resuming (``-1``: start).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 500,
        div_factor: float = 25.0,
        final_div_factor: float = 1.0e4,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"WarmupOneCycleLR warmup_steps must be >= 0, got {warmup_steps}")
        if div_factor <= 0 or final_div_factor <= 0:
            raise ValueError(
                f"WarmupOneCycleLR div factors must be > 0, got {div_factor}, {final_div_factor}"
            )
        self.warmup_steps = warmup_steps
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int | float) -> None:
        """Set ``T`` (e.g. from ``trainer.estimated_stepping_batches``); warns when the warm-up does not fit."""
        if not math.isfinite(total_steps) or int(total_steps) < 1:
            raise ValueError(
                f"WarmupOneCycleLR total_steps must be a positive number of steps, got {total_steps} (a run "
                "without max_epochs / max_steps has no length)"
            )
        self.total_steps = int(total_steps)
        if self.warmup_steps >= self.total_steps:
            warnings.warn(
                f"WarmupOneCycleLR: warmup_steps={self.warmup_steps} >= total_steps={self.total_steps}; the "
                "learning rate never reaches its peak in this run",
                stacklevel=2,
            )

    def lr_factor(self, step: int) -> float:
        """The learning rate after ``step`` optimiser steps, as a fraction of the peak (configured) rate."""
        start = 1.0 / self.div_factor
        end_warmup = self.warmup_steps - 1  # torch: float(pct_start * total_steps) - 1
        if step < end_warmup:
            return _cos_anneal(start, 1.0, step / end_warmup)
        end_warmup = max(end_warmup, 0)
        if step == end_warmup:
            return 1.0  # the peak, whatever the run's length
        if self.total_steps is None:
            raise RuntimeError(
                "WarmupOneCycleLR.total_steps is unset past the warm-up; set it in the scheduler's init_args or "
                "let the method fill it in (with_total_steps)"
            )
        span = self.total_steps - 1 - end_warmup
        progress = 1.0 if span <= 0 else min(1.0, (step - end_warmup) / span)
        return _cos_anneal(1.0, start / self.final_div_factor, progress)

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


def _cos_anneal(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (``pct = 0``) to ``end`` (``pct = 1``), as torch's ``OneCycleLR``."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def with_total_steps(
    scheduler: LRSchedulerCallable, total_steps: Callable[[], int | float]
) -> LRSchedulerCallable:
    """Wrap an injected scheduler so that one built with ``total_steps=None`` gets ``total_steps()``.

    ``total_steps`` is called only then (it may query the trainer). Schedulers that do not implement
    :class:`NeedsTotalSteps`, or whose length was configured, are returned as built.
    """

    def build(optimizer: Optimizer) -> LRScheduler:
        sched = scheduler(optimizer)
        if isinstance(sched, NeedsTotalSteps) and sched.total_steps is None:
            sched.set_total_steps(total_steps())
        return sched

    return build
