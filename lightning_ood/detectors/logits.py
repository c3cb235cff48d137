"""Detectors that read only the logits. Closed forms; higher = more OOD."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs


class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): ``-max_c softmax(z)_c``."""

    def score(self, batch: DetectorInputs) -> Tensor:
        return -batch.logits.float().softmax(dim=1).amax(dim=1)


class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., ICML 2022, "Scaling OOD detection"): ``-max_c z_c``."""

    def score(self, batch: DetectorInputs) -> Tensor:
        return -batch.logits.float().amax(dim=1)


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
        return -t * torch.logsumexp(batch.logits.float() / t, dim=1)


class Entropy(Detector):
    """Shannon entropy of the softmax, ``-sum_c p_c log p_c`` (nats); uniform predictions score highest."""

    def score(self, batch: DetectorInputs) -> Tensor:
        logp = batch.logits.float().log_softmax(dim=1)
        return -(logp.exp() * logp).sum(dim=1)


class GEN(Detector):
    """Generalised entropy (Liu et al., CVPR 2023, eq. 6) over the ``top_k`` largest probabilities.

    ``G_gamma(p) = sum_{j<=M} p_j^gamma (1 - p_j)^gamma``; larger for flatter (more OOD) predictions.

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
        p = batch.logits.float().softmax(dim=1)
        p = p.topk(min(self.top_k, p.shape[1]), dim=1).values
        return (p.pow(self.gamma) * (1 - p).pow(self.gamma)).sum(dim=1)
