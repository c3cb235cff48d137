"""Detectors that read only the logits. Closed forms; higher = more OOD.

Every detector takes ``[B, C]`` logits and returns ``[B]`` scores in the logits' dtype promoted to at least
float32 (float16 / bfloat16 are computed in float32, float64 stays float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs
from lightning_ood.precision import at_least_float32


def log_softmax_and_complement(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p, log(1 - p))``, both ``[B, C]``, for ``p = softmax(logits)`` of ``[B, C]`` logits.

    Accurate also for confident rows, where ``p_max`` rounds to 1 and both ``1 - p_max`` and
    ``log p_max = -log(1 + s)`` (``s = sum_{c != max} exp(z_c - z_max)``) would round to 0 if formed directly:
    here ``log(1 + s)`` is ``logaddexp(0, log s)`` and ``log(1 - p_max) = log s - log(1 + s)``, with ``log s``
    a logsumexp over the other classes (``-inf`` for a single class, which gives ``1 - p = 0``). For the
    other classes ``p_c <= 1/2``, so ``log(1 - p_c) = log1p(-p_c)`` is accurate.
    """
    z = at_least_float32(logits.detach())
    top = z.argmax(dim=1, keepdim=True)
    shifted = z - z.gather(1, top)  # <= 0, exactly 0 at the arg-max
    log_s = torch.logsumexp(shifted.scatter(1, top, -torch.inf), dim=1, keepdim=True)
    log_one_plus_s = torch.logaddexp(torch.zeros_like(log_s), log_s)  # logsumexp of all classes
    log_p = shifted - log_one_plus_s
    log_q = torch.log1p(-log_p.exp()).scatter(1, top, log_s - log_one_plus_s)
    return log_p, log_q


def shared_log_softmax(batch: DetectorInputs) -> tuple[Tensor, Tensor]:
    """:func:`log_softmax_and_complement` of the batch's logits, computed once per batch (Entropy, GEN)."""
    return batch.shared(("log_softmax_and_complement",), lambda: log_softmax_and_complement(batch.logits))


class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): ``-max_c softmax(z)_c``, in ``[-1, -1/C]``."""

    def score(self, batch: DetectorInputs) -> Tensor:
        return -at_least_float32(batch.logits.detach()).softmax(dim=1).amax(dim=1)


class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., ICML 2022, "Scaling OOD detection"): ``-max_c z_c``."""

    def score(self, batch: DetectorInputs) -> Tensor:
        return -at_least_float32(batch.logits.detach()).amax(dim=1)


class Energy(Detector):
    """Free energy (Liu et al., NeurIPS 2020, eq. 5): ``-T * logsumexp(z / T)``.

    Args:
        temperature: ``T > 0``; the paper uses 1.
    """

    def __init__(self, temperature: float = 1.0, name: str | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"Energy temperature must be > 0, got {temperature}")
        super().__init__(name)
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def score(self, batch: DetectorInputs) -> Tensor:
        t = self.temperature
        return -t * torch.logsumexp(at_least_float32(batch.logits.detach()) / t, dim=1)


class Entropy(Detector):
    """Shannon entropy of the softmax, ``-sum_c p_c log p_c`` (nats), in ``[0, log C]``; uniform predictions
    score highest. ``log p`` from :func:`log_softmax_and_complement`, so confident rows keep their small
    entropy instead of losing the ``p_max log p_max`` term."""

    def score(self, batch: DetectorInputs) -> Tensor:
        log_p, _ = shared_log_softmax(batch)
        return -(log_p.exp() * log_p).sum(dim=1)


class GEN(Detector):
    """Generalised entropy (Liu et al., CVPR 2023, eq. 6) over the ``top_k`` largest probabilities.

    ``G_gamma(p) = sum_{j<=M} p_j^gamma (1 - p_j)^gamma``; larger for flatter (more OOD) predictions. Each
    term is ``exp(gamma * (log p_j + log(1 - p_j)))`` from :func:`log_softmax_and_complement`: for a confident
    row ``(1 - p_max)^gamma`` is far from 0 (``1e-14 ** 0.1 = 0.04``) although ``1 - p_max`` rounds to 0.

    Args:
        gamma: exponent in ``(0, 1)``; the paper uses 0.1.
        top_k: ``M``, how many of the largest probabilities enter; the paper uses 100 (capped at C).
    """

    def __init__(self, gamma: float = 0.1, top_k: int = 100, name: str | None = None) -> None:
        if not 0 < gamma < 1:
            raise ValueError(f"GEN gamma must be in (0, 1), got {gamma}")
        if top_k < 1:
            raise ValueError(f"GEN top_k must be >= 1, got {top_k}")
        super().__init__(name)
        self.gamma = gamma
        self.top_k = top_k

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, top_k={self.top_k}"

    def score(self, batch: DetectorInputs) -> Tensor:
        log_p, log_q = shared_log_softmax(batch)
        top = log_p.topk(min(self.top_k, log_p.shape[1]), dim=1).indices
        return (self.gamma * (log_p.gather(1, top) + log_q.gather(1, top))).exp().sum(dim=1)
