"""OpenMax: extreme-value recalibration of the logits with an extra "unknown" class."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import (
    Detector,
    DetectorInputs,
    all_gather_cat,
    all_reduce_max,
    all_reduce_sum,
)
from lightning_ood.detectors.streaming import check_fraction, logits_of

_F64 = torch.float64
#: libMR shifts every distance by this constant minus the tail's minimum before fitting (OpenMax's code).
TRANSLATION = 10000.0


def weibull_fit(tails: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood shape ``k`` ``[K]`` and scale ``lam`` ``[K]`` of a two-parameter Weibull (location 0)
    for each row of positive ``tails`` ``[K, T]`` (float64).

    The shape solves ``sum_i x_i^k ln x_i / sum_i x_i^k - 1/k - mean(ln x) = 0`` (increasing in ``k``) by
    bisection in ``log k`` to float64 precision; then ``lam = mean(x^k)^(1/k)``. Powers are taken relative to
    the row maximum, so shapes in the thousands (libMR's translated tails) do not overflow.
    """
    logs = tails.log()
    top = logs.amax(dim=1, keepdim=True)
    mean_log = logs.mean(dim=1)

    def gap(k: Tensor) -> Tensor:
        w = (k[:, None] * (logs - top)).exp()
        return (w * logs).sum(1) / w.sum(1) - 1.0 / k - mean_log

    lo = torch.full_like(mean_log, math.log(1e-6))
    hi = torch.full_like(mean_log, math.log(1e12))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        positive = gap(mid.exp()) > 0
        hi, lo = torch.where(positive, mid, hi), torch.where(positive, lo, mid)
    k = (0.5 * (lo + hi)).exp()
    lam = (top[:, 0] + ((k[:, None] * (logs - top)).exp().mean(1)).log() / k).exp()
    return k, lam


class OpenMax(Detector):
    """OpenMax (Bendale & Boult, CVPR 2016, "Towards open set deep networks", Alg. 1-2): the softmax
    probability of the unknown class after recalibrating the top ``alpha`` logits (higher = more OOD).

    Fit (Alg. 1): for each class ``c`` the mean activation vector ``mu_c`` ``[C]`` (the mean logits of the
    fit samples of class ``c`` that the network classifies correctly) and a Weibull fitted to the
    ``tailsize`` largest distances ``d(v, mu_c)`` of those samples, with libMR's translation (each tail is
    shifted by ``10000 - min(tail)`` before the fit, as the official code does). Score (Alg. 2) for logits
    ``v`` with classes ranked ``s(1), s(2), ...`` by ``v``: ``omega_s(i) = 1 - (alpha + 1 - i) / alpha *
    W_s(i)(d(v, mu_s(i)))`` for ``i <= alpha`` (the official code's rank weights) and 1 for the others;
    ``v_hat = v * omega``, ``v_hat_0 = sum_c v_c (1 - omega_c)``, score ``softmax([v_hat_0, v_hat])_0``.
    ``d = w * ||v - mu|| + (1 - w) * (1 - cos(v, mu))``. The softmax is the stable one (the official code
    clips the revised logits at 709 before ``exp``).

    Memory: the fit keeps the logits of the correctly classified fit samples (``N * C`` float32 on the CPU)
    until :meth:`finalize`, which needs ``mu_c`` before any distance exists; under DDP only the ``[C, tailsize]``
    tails are gathered. Opt-in.

    Args:
        tailsize: distances per class in the Weibull fit; 20 (the paper's).
        alpha: how many top classes are recalibrated (capped at ``C``); 10 (the paper's).
        euclid_weight: ``w`` in ``[0, 1]``; 1 (Euclidean distance).
    """

    needs_fit: ClassVar[bool] = True
    default_name = "openmax"

    def __init__(
        self, tailsize: int = 20, alpha: int = 10, euclid_weight: float = 1.0, name: str | None = None
    ) -> None:
        if tailsize < 2 or alpha < 1:
            raise ValueError(f"OpenMax needs tailsize >= 2 and alpha >= 1, got {tailsize}, {alpha}")
        check_fraction("OpenMax", "euclid_weight", euclid_weight, closed_high=True)
        super().__init__(name)
        self.tailsize, self.alpha, self.euclid_weight = tailsize, alpha, euclid_weight
        for buf in ("centers", "shape", "scale", "shift"):
            self.register_buffer(buf, torch.empty(0, dtype=_F64))  # [C, C], [C], [C], [C]
        self._stored: list[tuple[Tensor, Tensor]] = []

    def extra_repr(self) -> str:
        return f"tailsize={self.tailsize}, alpha={self.alpha}, euclid_weight={self.euclid_weight}"

    def reset(self) -> None:
        super().reset()
        self._stored = []

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        logits = logits_of(batch, "OpenMax")
        targets = targets.to(logits.device)
        keep = logits.argmax(dim=1) == targets
        self._stored.append((logits[keep].to("cpu", torch.float32), targets[keep].cpu()))

    def distances(self, logits: Tensor, centers: Tensor) -> Tensor:
        """``[B, K]`` distances of ``[B, C]`` logits to ``[K, C]`` centres."""
        d = torch.cdist(logits, centers) * self.euclid_weight
        if self.euclid_weight < 1:
            cos = (
                torch.nn.functional.normalize(logits, dim=1)
                @ torch.nn.functional.normalize(centers, dim=1).mT
            )
            d = d + (1 - self.euclid_weight) * (1 - cos)
        return d

    def finalize(self) -> None:
        device = self.centers.device
        width = next((v.shape[1] for v, _ in self._stored if v.ndim == 2), 0)
        c = int(all_reduce_max(torch.tensor([width], dtype=torch.long, device=device))[0])
        logits = torch.cat([v for v, _ in self._stored]).to(device, _F64) if self._stored else None
        labels = torch.cat([t for _, t in self._stored]).to(device) if self._stored else None
        self._stored = []
        sums = torch.zeros(c, c + 1, dtype=_F64, device=device)
        if logits is not None and logits.shape[0]:
            sums.index_add_(0, labels, torch.cat([logits, torch.ones_like(logits[:, :1])], dim=1))
        sums = all_reduce_sum(sums)
        missing = (sums[:, -1] == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"OpenMax: class(es) {missing[:10]} have no correctly classified fit sample, so their mean "
                "activation vector is undefined; fit on a trained network"
            )
        centers = sums[:, :-1] / sums[:, -1:]
        tails = torch.full((c, self.tailsize), -math.inf, dtype=_F64, device=device)
        if logits is not None and logits.shape[0]:
            own = self.distances(logits, centers).gather(1, labels[:, None])[:, 0]
            for cls in labels.unique().tolist():
                values = own[labels == cls]
                top = values.topk(min(self.tailsize, values.numel())).values
                tails[cls, : top.numel()] = top
        tails = all_gather_cat(tails.mT.contiguous()).mT  # [C, world * tailsize]
        tails = tails.topk(self.tailsize, dim=1).values
        if bool(torch.isinf(tails).any()):
            raise ValueError(f"OpenMax: a class has fewer than tailsize={self.tailsize} correct fit samples")
        shift = TRANSLATION - tails.amin(dim=1)
        shape, scale = weibull_fit(tails + shift[:, None])
        self.centers, self.shape, self.scale, self.shift = centers, shape, scale, shift
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` probability of the unknown class, in ``(0, 1)``; higher = more OOD."""
        v = logits_of(batch, "OpenMax").to(_F64)
        c = v.shape[1]
        alpha = min(self.alpha, c)
        dist = self.distances(v, self.centers.to(v.device))  # [B, C]
        cdf = 1.0 - (-(((dist + self.shift) / self.scale).clamp_min(0.0) ** self.shape)).exp()
        ranks = v.argsort(dim=1, descending=True)[:, :alpha]
        weights = torch.zeros_like(v).scatter(
            1,
            ranks,
            ((alpha + 1 - torch.arange(1, alpha + 1, dtype=_F64, device=v.device)) / alpha).expand_as(ranks),
        )
        omega = 1.0 - weights * cdf
        revised = torch.cat([(v * (1 - omega)).sum(dim=1, keepdim=True), v * omega], dim=1)
        return revised.softmax(dim=1)[:, 0]
