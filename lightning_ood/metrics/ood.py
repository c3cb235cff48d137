"""``OODMetrics``: a ``torchmetrics.Metric`` shell around :func:`.functional.ood_metrics`."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_ood.metrics.functional import METRIC_KEYS, ood_metrics


class OODMetrics(Metric):
    """Exact OOD metrics (the keys of ``METRIC_KEYS``) for one ID set against one OOD set.

    Every score and label is kept (list states reduced by concatenation), so the result is exact and, under
    DDP, equal to the single-process result whatever the batching. ``update`` may receive batches that hold
    only ID or only OOD samples; only the accumulated data must contain both. Each list state starts with an
    empty float64 ``[0]`` tensor (again after ``reset``), so a rank that never saw a batch still gathers a
    float64 tensor like the other ranks (torchmetrics would otherwise send a float32 placeholder, which breaks
    the gather).

    torchmetrics' binary ROC / AUROC / average-precision metrics are deliberately not used: they treat their
    input as probabilities or logits and apply a sigmoid to any batch with a value outside [0, 1]
    (torchmetrics issues 1989 and 2819). With raw, unbounded OOD scores that silently changes the ranking
    between batches that were and were not squashed, and the metric is wrong.

    Args:
        set_name: name of the evaluated set, used in error messages (e.g. ``"svhn"``).

    Example:
        >>> metric = OODMetrics(set_name="svhn")
        >>> metric.update(torch.tensor([0.1, 5.0]), torch.tensor([0, 1]))
        >>> float(metric.compute()["auroc"])
        1.0
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    scores: list[Tensor]
    is_ood: list[Tensor]

    def __init__(self, set_name: str = "scores", **kwargs) -> None:
        super().__init__(**kwargs)
        self.set_name = set_name
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")
        self._seed_empty()

    def _seed_empty(self) -> None:
        """Put an empty float64 ``[0]`` tensor into each list state: the dtype every rank gathers."""
        self.scores.append(torch.empty(0, dtype=torch.float64, device=self.device))
        self.is_ood.append(torch.empty(0, dtype=torch.float64, device=self.device))

    def reset(self) -> None:
        super().reset()
        self._seed_empty()

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        """Accumulate one batch.

        Args:
            scores: ``[B]`` raw scores, higher = more OOD (any float dtype; stored as float64).
            is_ood: ``[B]`` labels, 1 = OOD, 0 = ID (bool or numeric; checked for 0/1 in ``compute``).
        """
        if scores.ndim != 1 or scores.shape != is_ood.shape:
            raise ValueError(
                f"{self.set_name!r}: update expects scores and is_ood of shape [B], got "
                f"{tuple(scores.shape)} and {tuple(is_ood.shape)}; flatten them to one value per sample."
            )
        # float64 for both states: one dtype on every rank for all_gather, and a label such as 0.5 is kept
        # (not truncated to 0) so that compute can report it.
        self.scores.append(scores.detach().to(torch.float64))
        self.is_ood.append(is_ood.detach().to(torch.float64))

    def compute(self) -> dict[str, Tensor]:
        """Return ``{key: float64 scalar tensor}`` for every key of ``METRIC_KEYS``, in that order."""
        # The seeded empty entry makes the states non-empty; no update at all gives the "set is empty" error.
        values = ood_metrics(dim_zero_cat(self.scores), dim_zero_cat(self.is_ood), set_name=self.set_name)
        return {key: torch.tensor(values[key], dtype=torch.float64) for key in METRIC_KEYS}
