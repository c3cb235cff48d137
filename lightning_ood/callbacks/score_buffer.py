"""Collects one test set's per-detector scores, predictions and targets; exact under DDP."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class ScoreBuffer(Metric):
    """Concatenating buffer for one test set (``dist_reduce_fx="cat"``: every rank's samples, once each).

    ``update(scores [B, K], preds [B], targets [B])``; ``compute()`` returns the three tensors over all ranks.
    Scores are kept in float64 all the way to the metrics. A method that does not classify passes ``preds=None``
    (stored as ``-1``).
    An empty ``[0, K]`` entry is stored at construction so a rank that saw no batch of this set still takes part
    in the gather instead of hanging it.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_detectors: int) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.num_detectors = num_detectors
        self._seed_empty()

    def _seed_empty(self) -> None:
        self.scores.append(torch.empty(0, self.num_detectors, dtype=torch.float64, device=self.device))
        self.preds.append(torch.empty(0, dtype=torch.long, device=self.device))
        self.targets.append(torch.empty(0, dtype=torch.long, device=self.device))

    def reset(self) -> None:
        super().reset()
        self._seed_empty()

    def update(self, scores: Tensor, preds: Tensor | None, targets: Tensor) -> None:
        self.scores.append(scores.detach().to(torch.float64))
        self.preds.append(torch.full_like(targets, -1).long() if preds is None else preds.detach().long())
        self.targets.append(targets.detach().long())

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        return dim_zero_cat(self.scores), dim_zero_cat(self.preds), dim_zero_cat(self.targets)
