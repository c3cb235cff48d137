"""Seeded bootstrap confidence intervals for AUROC and both FPR95s, vectorised over resamples.

A resample draws ``n_id`` ID scores and, independently for each OOD set, ``n_ood`` OOD scores with replacement
(ID and OOD are resampled separately, so every resample keeps the original set sizes). It is represented by
how often each original sample was drawn, a row of integer weights, instead of by the drawn scores: the
scores are sorted once, and each resample's ROC counts are weighted cumulative sums over that one order. So
1000 resamples cost 1000 cumulative sums, not 1000 sorts, and every resample's metrics equal
:func:`~lightning_ood.metrics.functional.ood_metrics` on the explicitly resampled arrays (tie groups
included; the tests check this). Resamples are processed in chunks that keep memory bounded.

The ID resample is shared by all OOD sets of one resample index, as the ID set is shared by their metrics;
a group's (near / far / all) interval is the percentile interval of the per-resample mean over its sets.

Why not ``torchmetrics.wrappers.BootStrapper``: it resamples the whole batch of (score, label) pairs jointly
(so the ID / OOD proportions vary between resamples, and a resample can lack one class), re-runs the metric
once per resample, and its AUROC squashes raw scores (see ``OODMetrics``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_ood.metrics.functional import (
    ArrayLike,
    _as_cpu_float64,
    _auroc,
    _curves,
    _fpr_at_tpr,
    _per_group,
    _tie_groups,
)

__all__ = ["BOOTSTRAP_KEYS", "bootstrap_intervals", "bootstrap_resamples"]

#: The metrics that get intervals; a row gets ``<key>_lo`` and ``<key>_hi`` for each.
BOOTSTRAP_KEYS: tuple[str, ...] = ("auroc", "fpr95_idpos", "fpr95_oodpos")

# Elements of one [resamples, n] float64 working array per chunk (~32 MB); a few such arrays are alive at once.
_CHUNK_ELEMENTS = 4_000_000


class _SortedSet:
    """One ID-vs-OOD set sorted once; both curve directions are read from the same tie groups."""

    def __init__(self, id_scores: Tensor, ood_scores: Tensor) -> None:
        is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))]).double()
        _, self.order, self.group_end = _tie_groups(torch.cat([id_scores, ood_scores]))
        self.is_ood_sorted = is_ood[self.order]

    def metrics(self, weights: Tensor) -> dict[str, Tensor]:
        """``[B]`` AUROC and FPR95s of the ``B`` resamples whose per-sample draw counts are ``weights``."""
        w = weights[:, self.order]
        pos = _per_group(torch.cumsum(w * self.is_ood_sorted, dim=1)[:, self.group_end])
        size = _per_group(torch.cumsum(w, dim=1)[:, self.group_end])
        fps, tps, fps_in, tps_in = _curves(pos, size)
        return {
            "auroc": _auroc(fps, tps),
            "fpr95_idpos": _fpr_at_tpr(fps_in, tps_in, 0.95),
            "fpr95_oodpos": _fpr_at_tpr(fps, tps, 0.95),
        }


def _draw_counts(n: int, resamples: int, generator: torch.Generator) -> Tensor:
    """``[resamples, n]`` float64 draw counts of ``n`` samples drawn with replacement, ``resamples`` times."""
    picks = torch.randint(n, (resamples, n), generator=generator)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(1).double().expand_as(picks)
    )


def bootstrap_resamples(
    id_scores: ArrayLike,
    ood_scores: Mapping[str, ArrayLike],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Tensor]]:
    """``{ood_set: {key: [resamples] values}}`` for every key of ``BOOTSTRAP_KEYS``, seeded and deterministic.

    Args:
        id_scores: ``[n_id]`` ID scores (higher = more OOD), shared by every OOD set.
        ood_scores: ``{name: [n_ood] scores}``, one entry per OOD set.
        resamples: number of bootstrap resamples.
        seed: seed of the draws; the same inputs, ``resamples`` and ``seed`` give the same values.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    ids = _as_cpu_float64(id_scores)
    oods = {name: _as_cpu_float64(s) for name, s in ood_scores.items()}
    for name, s in {"ID": ids, **oods}.items():
        if s.ndim != 1 or len(s) == 0 or torch.isnan(s).any():
            raise ValueError(
                f"bootstrap: the {name!r} scores must be a non-empty 1-D array without NaN, got shape "
                f"{tuple(s.shape)}; compute the point metrics first (ood_metrics names the problem)."
            )
    sets = {name: _SortedSet(ids, s) for name, s in oods.items()}
    generator = torch.Generator().manual_seed(seed)
    largest = len(ids) + max(len(s) for s in oods.values())
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // largest))
    out: dict[str, dict[str, list[Tensor]]] = {name: {k: [] for k in BOOTSTRAP_KEYS} for name in sets}
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        id_weights = _draw_counts(len(ids), size, generator)
        for name, sorted_set in sets.items():
            weights = torch.cat([id_weights, _draw_counts(len(oods[name]), size, generator)], dim=1)
            for key, values in sorted_set.metrics(weights).items():
                out[name][key].append(values)
    return {name: {k: torch.cat(v) for k, v in per_key.items()} for name, per_key in out.items()}


def bootstrap_intervals(
    id_scores: ArrayLike,
    ood_scores: Mapping[str, ArrayLike],
    groups: Mapping[str, Sequence[str]] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Percentile intervals ``{set_or_group: {"<key>_lo": .., "<key>_hi": ..}}`` at confidence ``level``.

    Args:
        id_scores, ood_scores, resamples, seed: as :func:`bootstrap_resamples`.
        groups: ``{group: [ood sets]}``; each gets the interval of the mean of its sets' metrics.
        level: the interval's nominal coverage, e.g. 0.95 for the 2.5 % and 97.5 % percentiles.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    per_set = bootstrap_resamples(id_scores, ood_scores, resamples, seed)
    values = dict(per_set)
    for group, members in (groups or {}).items():
        missing = [m for m in members if m not in per_set]
        if missing or not members:
            raise ValueError(f"group {group!r} names sets {missing or members} that have no scores")
        values[group] = {k: torch.stack([per_set[m][k] for m in members]).mean(0) for k in BOOTSTRAP_KEYS}
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    intervals = {}
    for name, per_key in values.items():
        intervals[name] = {}
        for key, v in per_key.items():
            lo, hi = torch.quantile(v, q).tolist()
            intervals[name][f"{key}_lo"], intervals[name][f"{key}_hi"] = lo, hi
    return intervals
