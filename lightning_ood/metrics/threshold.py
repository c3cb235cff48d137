"""Choosing an operating threshold for a score from ID validation data alone (no OOD data needed).

An image is flagged OOD when its score is *above* the threshold (higher score = more OOD). At ID recall ``r``
the threshold is the smallest observed ID score ``t`` with ``P(s_id <= t) >= r``: at least ``r`` of the ID
validation images are kept as ID, and no smaller observed score would keep that many. Equal scores are never
split (all of them lie on one side of ``t``), so with ties more than ``r`` may be kept. This is the threshold
of the ``fpr95_idpos`` metric (ODIN's convention: "the threshold that keeps 95 % of ID samples"), applied to
ID data only.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor


def threshold_at_id_recall(id_scores: Tensor, recall: float = 0.95) -> float:
    """The score threshold that keeps at least ``recall`` of the ID images (``score <= threshold`` = ID).

    Args:
        id_scores: ``[N]`` scores of ID validation images, higher = more OOD; no NaN.
        recall: the fraction of ID images to keep, in ``(0, 1]``.

    Returns:
        The ``ceil(recall * N)``-th smallest score (exact rational arithmetic, so 0.95 of 20 is the 19th).

    Raises:
        ValueError: on an empty or NaN-holding ``id_scores`` or a ``recall`` outside ``(0, 1]``.
    """
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be in (0, 1] (e.g. 0.95 for 95 % of ID images kept), got {recall}")
    scores = torch.as_tensor(id_scores).detach().flatten().double().cpu()
    if scores.numel() == 0:
        raise ValueError("no ID validation scores to choose a threshold from (is data.val_fraction 0?)")
    if torch.isnan(scores).any():
        raise ValueError(f"{int(torch.isnan(scores).sum())} ID validation scores are NaN")
    k = math.ceil(Fraction(str(recall)) * scores.numel())  # at least k of N ID scores must be <= threshold
    return float(torch.sort(scores).values[k - 1])
