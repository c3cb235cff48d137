"""An exact percentile of values held across ranks, without gathering them: distributed selection by histogram
refinement.

Every rank keeps its own values (for ReAct: its share of the ``N x D`` ID-train activations, ``N * D / W``
values). The ranks agree on a window known to hold the wanted order statistic (at first the global
``[min, max]``), all-reduce a histogram of the window (``bins`` counts, with each bin's smallest and largest
value), and narrow the window to the values of the bin that holds the statistic; they repeat until the window
holds at most ``gather_limit`` values over all ranks, or a single distinct value. Then those few values are
gathered and the statistic is read off. The result is **exact** (error 0, not an estimate): the value
``np.percentile`` (``method="linear"``) gives on the union of all ranks' values. Bin indices
``floor((x - lo) * bins / (hi - lo))`` are monotone in ``x`` (IEEE rounding is monotone), so a bin's values
are exactly those between its smallest and largest: no value is counted in two windows or lost between them.

Cost: each pass reads the local values once, ``chunk`` at a time in their own dtype (transient memory about
``chunk * 9`` bytes: the bin indices and a mask); a pass divides the window by about ``bins``, so at most three
passes over the data are typical (range, histogram, gather). Communication per pass: ``3 * bins`` numbers and a
few scalars, never the values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from lightning_ood.distributed import all_gather_cat, all_reduce_max, all_reduce_sum


def _chunks(parts: Sequence[Tensor], chunk: int, lo: float, hi: float) -> Iterator[Tensor]:
    """The values in ``[lo, hi]`` (bounds that are values of the data, so exact in its dtype), chunk by chunk."""
    whole = lo == -math.inf and hi == math.inf
    for part in parts:
        flat = part.reshape(-1)
        for start in range(0, flat.numel(), chunk):
            x = flat[start : start + chunk]
            yield x if whole else x[(x >= lo) & (x <= hi)]


def _global_range(parts: Sequence[Tensor], chunk: int, lo: float, hi: float, device) -> tuple[float, float]:
    """The global ``(min, max)`` of the values in ``[lo, hi]`` (``(inf, -inf)`` when there are none)."""
    low, high = math.inf, -math.inf
    for x in _chunks(parts, chunk, lo, hi):
        if x.numel():
            low, high = min(low, float(x.min())), max(high, float(x.max()))
    both = all_reduce_max(torch.tensor([-low, high], dtype=torch.float64, device=device))
    return -float(both[0]), float(both[1])


def _histogram(parts, chunk, lo, hi, bins, device) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``counts`` ``[bins]`` and each bin's smallest / largest value (``inf`` / ``-inf`` if empty)."""
    scale = bins / (hi - lo)
    counts = torch.zeros(bins, dtype=torch.long, device=device)
    dtype = parts[0].dtype if parts else torch.float64
    lows = torch.full((bins,), math.inf, dtype=dtype, device=device)
    highs = torch.full((bins,), -math.inf, dtype=dtype, device=device)
    for x in _chunks(parts, chunk, lo, hi):
        idx = ((x - lo) * scale).floor_().long().clamp_(0, bins - 1)
        counts += torch.bincount(idx, minlength=bins)
        lows.scatter_reduce_(0, idx, x, "amin")
        highs.scatter_reduce_(0, idx, x, "amax")
    lows, highs = lows.double(), highs.double()
    all_reduce_sum(counts)
    lows = -all_reduce_max(-lows)
    return counts, lows, all_reduce_max(highs)


def order_statistics(
    parts: Sequence[Tensor],
    rank: int,
    *,
    device: torch.device,
    bins: int = 4096,
    gather_limit: int = 1 << 20,
    chunk: int = 1 << 24,
) -> tuple[float, float]:
    """The ``rank``-th and ``rank + 1``-th smallest (0-based) of every rank's values together (the second is
    the first when ``rank`` is the last); a collective every rank enters.

    Args:
        parts: this rank's values, any shapes (all their elements count), one float dtype on every rank; may
            be empty.
        rank: ``0 <= rank < M``, ``M`` the number of values over all ranks.
        device: where the collectives' small tensors live (the values' device; NCCL needs the GPU).
        bins, gather_limit, chunk: histogram size, window size at which the values are gathered, and the
            values read at a time (see the module doc).
    """
    lo, hi = _global_range(parts, chunk, -math.inf, math.inf, device)
    below, inside = 0, None  # values (over all ranks) below the window, and in it (None: not counted yet)
    while lo < hi and (inside is None or inside > gather_limit):
        counts, lows, highs = _histogram(parts, chunk, lo, hi, bins, device)
        cum = counts.cumsum(0)
        i = int(torch.searchsorted(cum, torch.tensor([rank - below], device=device), right=True))
        below += int(cum[i - 1]) if i else 0
        lo, hi, inside = float(lows[i]), float(highs[i]), int(counts[i])
    if lo == hi:
        if inside is None:
            inside = int(all_reduce_sum(torch.tensor([sum(p.numel() for p in parts)], device=device)).item())
        first = lo
        if rank + 1 - below < inside:
            return first, first
    else:
        mine = [x.double() for x in _chunks(parts, chunk, lo, hi)]
        local = torch.cat(mine) if mine else torch.empty(0, dtype=torch.float64, device=device)
        values = all_gather_cat(local.to(device)).sort().values
        first = float(values[rank - below])
        if rank + 1 - below < len(values):
            return first, float(values[rank + 1 - below])
    after = _next_above(parts, chunk, hi, device)
    return first, first if after == math.inf else after


def _next_above(parts: Sequence[Tensor], chunk: int, value: float, device) -> float:
    """The smallest value of any rank above ``value`` (``inf`` if none); a strict comparison in the values' own
    dtype (a float64 bound just above ``value`` could round back onto it in float32)."""
    low = math.inf
    for x in _chunks(parts, chunk, -math.inf, math.inf):
        above = x[x > value]
        if above.numel():
            low = min(low, float(above.min()))
    return -float(all_reduce_max(torch.tensor([-low], dtype=torch.float64, device=device))[0])


def distributed_percentile(
    parts: Sequence[Tensor], q: float, *, device: torch.device, **options: int
) -> float:
    """``np.percentile(all values, q)`` (``method="linear"``) of every rank's ``parts`` together, exactly.

    A collective every rank enters (a rank may hold no values). The two order statistics around rank
    ``q / 100 * (M - 1)`` come from :func:`order_statistics`; the result is ``v_lo + frac * (v_hi - v_lo)`` in
    float64, the arithmetic of ``np.percentile``. Error: 0 (not an estimate). ``options``: as
    :func:`order_statistics`.

    Raises:
        ValueError: on every rank, when no rank holds a value.
    """
    local = sum(part.numel() for part in parts)
    m = int(all_reduce_sum(torch.tensor([local], dtype=torch.long, device=device)).item())
    if m == 0:
        raise ValueError("percentile of an empty set of values (no rank holds any)")
    pos = q / 100.0 * (m - 1)
    rank = math.floor(pos)
    frac = pos - rank
    v_lo, v_hi = order_statistics(parts, rank, device=device, **options)
    return v_lo if frac == 0.0 else v_lo + frac * (v_hi - v_lo)
