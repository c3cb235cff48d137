"""A memory estimate for per-class Gaussian statistics, checked when a fit starts, before anything is allocated.

``Mahalanobis(covariance="per_class")`` (OODformer's default) keeps a ``[C, D, D]`` float64 tensor: 8.4 GB at
C = 1000, D = 1024, 34 GB at D = 2048. Its fit peaks at about :data:`FIT_PEAK_FACTOR` (6) times that (the per-class
second moments, their re-centring terms, the scatter matrices, and the eigendecomposition's eigenvectors and
whiteners), so a fit that cannot fit in memory would otherwise fail (or swap) after a full pass over the data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

#: Peak memory of a per-class fit, in units of one ``[C, D, D]`` float64 tensor (accumulator, re-centring
#: terms, scatter, covariance, eigenvectors / whitener): 6.1x measured on CPU at C = 10, D = 2048 by
#: benchmarks/fit_memory_ddp.py (docs/benchmarks.md, section 9).
FIT_PEAK_FACTOR = 6


def per_class_bytes(classes: int, dim: int) -> tuple[int, int]:
    """``(kept, peak)`` bytes of per-class covariances: the fitted ``[C, D, D]`` float64 whiteners, and the fit's
    peak (:data:`FIT_PEAK_FACTOR` times that)."""
    kept = classes * dim * dim * 8
    return kept, FIT_PEAK_FACTOR * kept


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of ``/proc/meminfo``
    on a CPU (Linux); ``None`` where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_per_class_memory(
    classes: int, dim: int, device: torch.device, who: str, limit_gb: float | None = None
) -> None:
    """Fail before a per-class fit whose estimated peak exceeds the memory available (or ``limit_gb``); warn
    when it needs more than half of it. The message gives the numbers and names the tied fallback.

    Raises:
        MemoryError: the estimated fit peak exceeds the limit.
    """
    kept, peak = per_class_bytes(classes, dim)
    limit = available_bytes(device) if limit_gb is None else int(limit_gb * 1e9)
    if limit is None:
        return
    where = (
        f"the {limit_gb} GB memory_limit_gb" if limit_gb is not None else f"the {_gb(limit)} free on {device}"
    )
    text = (
        f"detector {who!r}: per-class covariances for C={classes} classes of D={dim} features keep a [C, D, D] "
        f"float64 tensor of {_gb(kept)} and the fit peaks at about {_gb(peak)} ({FIT_PEAK_FACTOR}x), against "
        f"{where}. Use covariance='tied' (one [D, D] matrix: {_gb(dim * dim * 8)}; Lee et al.'s Mahalanobis), "
        "or fewer feature dimensions"
    )
    if peak > limit:
        raise MemoryError(text)
    if 2 * peak > limit:
        rank_zero_warn(text + " if the fit runs out of memory")
