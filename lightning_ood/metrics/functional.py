"""Exact OOD detection metrics as pure functions (definitions: README, Conventions -> Metrics).

Conventions shared by every function here:

* ``scores``: shape ``[N]``, raw and unbounded, **higher means more likely OOD**. Nothing is squashed,
  sigmoided or normalised; only the ranking of the scores matters.
* ``is_ood``: shape ``[N]``, 1 for OOD (the positive class) and 0 for ID.
* Inputs may be torch tensors or numpy arrays of any float dtype on any device; the maths runs on CPU in
  float64 and results are exact up to float64 rounding (no binning).
* Ties are grouped: a threshold never separates equal scores.
* ``±inf`` scores are allowed and sort to an end (``+inf`` is the most OOD). A NaN score, an empty ID set or
  an empty OOD set raise ``ValueError``.

The reference for every formula is scikit-learn's ``_ranking`` module; the tests compare against it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["METRIC_KEYS", "ood_metrics", "roc_curve"]

ArrayLike = Tensor | np.ndarray

#: The keys of :func:`ood_metrics` (and ``OODMetrics.compute``), in their fixed order.
METRIC_KEYS: tuple[str, ...] = (
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr95_idpos",
    "fpr95_oodpos",
    "detection_error",
)


def _as_cpu_float64(x: ArrayLike) -> Tensor:
    """Copy-free where possible: a detached CPU float64 view of ``x``."""
    x = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return x.to(device="cpu", dtype=torch.float64)


def _validate(scores: ArrayLike, is_ood: ArrayLike, set_name: str) -> tuple[Tensor, Tensor]:
    """Return ``(scores, is_ood)`` as CPU float64 ``[N]`` tensors, or raise an informative ``ValueError``."""
    s, y = _as_cpu_float64(scores), _as_cpu_float64(is_ood)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"{set_name!r}: scores and is_ood must both be 1-D of the same length, got shapes "
            f"{tuple(s.shape)} and {tuple(y.shape)}; pass one score and one 0/1 label per sample."
        )
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        examples = torch.unique(y[bad])[:5].tolist()
        raise ValueError(
            f"{set_name!r}: is_ood must contain only 0 (ID) and 1 (OOD), found {int(bad.sum())} other "
            f"values, e.g. {examples}; encode OOD samples as 1 and ID samples as 0."
        )
    nan = torch.isnan(s)
    if nan.any():
        n_nan_ood = int(nan[y == 1].sum())
        raise ValueError(
            f"{set_name!r}: {int(nan.sum())} NaN scores ({int(nan.sum()) - n_nan_ood} ID, {n_nan_ood} OOD); "
            "the detector produced NaN (check for 0/0, log of 0 or overflow); ±inf is allowed, NaN is not."
        )
    n_ood = int(y.sum())
    empty = [name for name, n in (("ID", len(y) - n_ood), ("OOD", n_ood)) if n == 0]
    if empty:
        raise ValueError(
            f"{set_name!r}: the {' and '.join(empty)} set is empty (n_id={len(y) - n_ood}, n_ood={n_ood}); "
            "OOD metrics need at least one ID sample (is_ood=0) and one OOD sample (is_ood=1)."
        )
    return s, y


def _tie_groups(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sorted scores, order, group_end)``: one descending sort, and the index of the last sample of each
    tie group in that order."""
    s_sorted, order = torch.sort(scores, descending=True)
    # `!=` rather than a difference: inf - inf is NaN and would split a tie of infinities.
    group_end = torch.nonzero(s_sorted[1:] != s_sorted[:-1]).flatten()
    return s_sorted, order, torch.cat([group_end, group_end.new_tensor([len(s_sorted) - 1])])


def _per_group(cumulative: Tensor) -> Tensor:
    """Per-group totals ``[..., K]`` from cumulative totals at the group ends (along the last dimension)."""
    return torch.diff(cumulative, dim=-1, prepend=cumulative.new_zeros(*cumulative.shape[:-1], 1))


def _group_counts(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One descending sort: per tie group, ``(positives, size, score)``, highest score first (``[K]`` each)."""
    s_sorted, order, group_end = _tie_groups(scores)
    pos = _per_group(torch.cumsum(positive[order], 0)[group_end])
    del order  # the [N] buffers are freed before the [K] work
    size = _per_group(group_end + 1).to(torch.float64)
    return pos, size, s_sorted[group_end]


def _curve(pos: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative (false, true) positive counts ``[..., K + 1]`` from per-group counts ``[..., K]`` (last
    dimension), with the leading ``(0, 0)`` point."""
    tps = torch.cumsum(pos, dim=-1)
    zero = tps.new_zeros(*tps.shape[:-1], 1)
    return torch.cat([zero, torch.cumsum(size, dim=-1) - tps], dim=-1), torch.cat([zero, tps], dim=-1)


def _curves(pos: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(fps, tps, fps_in, tps_in)``: OOD positive from the highest score, and ID positive: the same tie
    groups traversed from the lowest score, roles swapped."""
    fps, tps = _curve(pos, size)
    fps_in, tps_in = _curve((size - pos).flip(-1), size.flip(-1))
    return fps, tps, fps_in, tps_in


def _counts(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cumulative (false, true) positive counts at each distinct threshold, highest threshold first.

    Returns ``(fps, tps, thresholds)``, each ``[K + 1]`` for ``K`` distinct scores, starting with the empty
    prediction ``(0, 0, +inf)`` like sklearn's ``roc_curve``. Sample ``i`` is flagged positive at threshold
    ``t`` iff ``scores[i] >= t``, so equal scores always fall on the same side.
    """
    pos, size, thresholds = _group_counts(scores, positive)
    fps, tps = _curve(pos, size)
    inf = torch.full((1,), torch.inf, dtype=torch.float64)
    return fps, tps, torch.cat([inf, thresholds])


def roc_curve(
    scores: ArrayLike, is_ood: ArrayLike, set_name: str = "scores"
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ROC curve with OOD as the positive class and higher score = more OOD.

    Equals ``sklearn.metrics.roc_curve(is_ood, scores, drop_intermediate=False)``: one point per distinct
    score (ties grouped), thresholds decreasing and starting at ``(fpr, tpr) = (0, 0)`` with threshold
    ``+inf``. sklearn rejects infinite scores; here ``+inf`` scores form their own group whose threshold is
    also ``+inf`` (so the first two thresholds are both ``+inf``) and ``-inf`` scores form the last group.

    Returns:
        ``(fpr, tpr, thresholds)``, float64 CPU tensors of shape ``[K + 1]`` for ``K`` distinct scores.
    """
    s, y = _validate(scores, is_ood, set_name)
    fps, tps, thresholds = _counts(s, y)
    return fps / fps[-1], tps / tps[-1], thresholds


def _auroc(fps: Tensor, tps: Tensor) -> Tensor:
    """P(s_ood > s_id) + ½·P(s_ood = s_id), the Mann-Whitney U statistic over ``n_id·n_ood`` (last dimension).

    Exact trapezoid rule on integer counts: each tie group adds ``Δfp·(tp_prev + tp)/2`` pairs.
    """
    pairs = torch.sum(torch.diff(fps, dim=-1) * (tps[..., 1:] + tps[..., :-1]), dim=-1) / 2
    return pairs / (fps[..., -1] * tps[..., -1])


def _average_precision(fps: Tensor, tps: Tensor) -> float:
    """Step-wise (non-interpolated) AP = Σ_k (R_k − R_{k−1})·P_k, as sklearn's ``average_precision_score``."""
    precision = tps[1:] / (tps[1:] + fps[1:])
    return float(torch.sum(torch.diff(tps) * precision) / tps[-1])


def _fpr_at_tpr(fps: Tensor, tps: Tensor, tpr_level: float) -> Tensor:
    """FPR at the first (highest) threshold whose TPR reaches ``tpr_level``, like ``np.searchsorted`` (last
    dimension; one value per leading index)."""
    fpr, tpr = fps / fps[..., -1:], tps / tps[..., -1:]
    level = torch.full((*tpr.shape[:-1], 1), tpr_level, dtype=torch.float64)
    return torch.gather(fpr, -1, torch.searchsorted(tpr, level)).squeeze(-1)


def ood_metrics(scores: ArrayLike, is_ood: ArrayLike, set_name: str = "scores") -> dict[str, float]:
    """The six OOD metrics of the README (Conventions -> Metrics), one ID set against one OOD set, exact, tie-aware.

    * ``auroc``: P(s_ood > s_id) + ½·P(s_ood = s_id) (Hendrycks & Gimpel, ICLR 2017).
    * ``aupr_in`` / ``aupr_out``: step-wise average precision with ID / OOD as the positive class
      (ID positive ranks by ``-scores``); no interpolation.
    * ``fpr95_idpos``: FPR when ≥ 95 % of ID samples are kept, i.e. fraction of OOD samples accepted as ID
      (ODIN, Liang et al., ICLR 2018, and most papers).
    * ``fpr95_oodpos``: fraction of ID samples flagged when ≥ 95 % of OOD samples are flagged (OpenOOD v1.5,
      pytorch-ood).
    * ``detection_error``: min over thresholds of ½·(1 − TPR) + ½·FPR (ODIN), over the full ROC curve.

    Args:
        scores: ``[N]`` raw scores, higher = more OOD.
        is_ood: ``[N]`` labels, 1 = OOD, 0 = ID.
        set_name: name of the evaluated set, used in error messages.

    Returns:
        ``{key: value}`` with keys in the order of ``METRIC_KEYS``.
    """
    s, y = _validate(scores, is_ood, set_name)
    pos, size, _ = _group_counts(s, y)  # the only sort; everything else is O(distinct scores)
    del s, y
    fps, tps, fps_in, tps_in = _curves(pos, size)
    return {
        "auroc": float(_auroc(fps, tps)),
        "aupr_in": _average_precision(fps_in, tps_in),
        "aupr_out": _average_precision(fps, tps),
        "fpr95_idpos": float(_fpr_at_tpr(fps_in, tps_in, 0.95)),
        "fpr95_oodpos": float(_fpr_at_tpr(fps, tps, 0.95)),
        "detection_error": float(torch.min(0.5 * (1 - tps / tps[-1]) + 0.5 * (fps / fps[-1]))),
    }
