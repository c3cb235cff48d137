"""The tensor operations of WeiPer and WeiPer+KLD (:mod:`lightning_ood.detectors.weiper`; Granz, Heurich &
Landgraf, NeurIPS 2024, Sec. 3): the seeded perturbation directions ``u`` ``[r, C, D]``, the perturbed head
``w_c + delta ||w_c|| u_kc`` ``[r C, D]``, MSP over the perturbed logits, and the histogram densities, their
smoothing and the symmetric KL divergence WeiPer+KLD scores with. Pure functions of tensors (no state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_F64 = torch.float64


def perturbation_directions(repeats: int, classes: int, dim: int, seed: int) -> Tensor:
    """``[repeats, classes, dim]`` float32 unit vectors uniform on the sphere (normalised float64 standard
    normals from a CPU generator seeded with ``seed``, one ``[classes, dim]`` draw per repeat)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(repeats, classes, dim)
    for k in range(repeats):
        out[k] = F.normalize(torch.randn(classes, dim, generator=gen, dtype=_F64), dim=1)
    return out


def perturbed_heads(weight: Tensor, directions: Tensor, delta: float) -> Tensor:
    """``[r C, D]`` perturbed projections ``w_c + delta ||w_c|| u_kc`` of ``weight`` ``[C, D]`` and
    ``directions`` ``[r, C, D]``, repeat-major (row ``k C + c``), in ``weight``'s dtype."""
    norms = weight.norm(dim=1, keepdim=True)
    return (weight + delta * norms * directions.to(weight)).flatten(0, 1)


def weiper_msp(logits: Tensor) -> Tensor:
    """``[B]`` MSP_W: the mean over the ``r`` perturbed heads of the maximum softmax of ``[B, r, C]`` logits."""
    return logits.softmax(dim=2).amax(dim=2).mean(dim=1)


def bin_counts(values: Tensor, low: float, high: float, n_bins: int) -> Tensor:
    """``[B, n_bins]`` float64 counts of each row of ``values`` ``[B, M]`` in ``n_bins`` equal bins of
    ``[low, high]`` (bin ``floor((x - low) n_bins / (high - low))``, the last bin closed). Values outside the
    range fall in no bin; ``low == high``: the one value ``low`` falls in the first bin."""
    values = values.to(_F64)
    scale = n_bins / (high - low) if high > low else 0.0
    index = ((values - low) * scale).floor_().clamp_(0, n_bins - 1).long()
    offset = torch.arange(values.shape[0], device=values.device)[:, None] * n_bins
    flat = (index + offset)[(values >= low) & (values <= high)]
    return torch.bincount(flat, minlength=values.shape[0] * n_bins).to(_F64).view(-1, n_bins)


def smooth(q: Tensor, width: int) -> Tensor:
    """``[B, n]`` moving average of width ``width`` along the bins of ``q`` ``[B, n]``: bin ``k`` averages bins
    ``k - (width - 1) // 2 .. k + width // 2``, the edge bins repeated beyond the ends."""
    if width == 1:
        return q
    padded = F.pad(q[:, None], ((width - 1) // 2, width // 2), mode="replicate")[:, 0]
    return padded.unfold(1, width, 1).mean(dim=2)


def symmetric_kl(p: Tensor, q: Tensor, eps: float) -> Tensor:
    """``[B]`` ``KL(p' || q') + KL(q' || p') = sum_k (p'_k - q'_k)(log p'_k - log q'_k)`` of the training
    density ``p`` ``[n]`` and each row of ``q`` ``[B, n]``, with ``x' = (x + eps) / sum(x + eps)``."""
    p = (p + eps) / (p + eps).sum()
    q = (q + eps) / (q + eps).sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)
