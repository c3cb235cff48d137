"""GMM: the class-conditional Gaussian mixture likelihood of the features (per-class covariances)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_ood.detectors.base import DetectorInputs
from lightning_ood.detectors.gaussian_stats import Moments
from lightning_ood.detectors.mahalanobis import Mahalanobis


class GMM(Mahalanobis):
    """Negative log-likelihood under a Gaussian mixture with one component per class (the density of
    Mukhoti et al., CVPR 2023, "Deep deterministic uncertainty: a new simple baseline", eq. 2; Lee et al. 2018
    with per-class covariances):

    ``-log sum_c pi_c N(z; mu_c, Sigma_c)
    = -logsumexp_c( log pi_c - 1/2 (d_c(z) + log det Sigma_c + D log 2 pi) )``

    ``pi_c = n_c / N`` are the training class priors, ``mu_c``, ``Sigma_c`` each class's mean and maximum-likelihood
    covariance, ``d_c`` the squared Mahalanobis distance of :class:`Mahalanobis` (``covariance="per_class"``,
    same streaming fit, memory ``O(C * D^2)``, same relative ``ridge`` and eigenvalue cut-off). ``log det``
    is of the same regularised covariance (a pseudo-determinant over the kept eigenvalues), so the density
    is that of the Gaussians whose distances are used. ``z``: ``[B, D]``; returns ``[B]`` float64, higher =
    more OOD. Opt-in (``O(C * D^2)`` memory, like per-class Mahalanobis).

    Args:
        ridge: relative ridge of every class covariance, as in :class:`Mahalanobis`; 1e-6.
    """

    default_name = "gmm"

    def __init__(self, ridge: float = 1e-6, name: str | None = None) -> None:
        super().__init__(covariance="per_class", ridge=ridge, name=name)
        self.register_buffer("log_det", torch.empty(0, dtype=torch.float64))  # [C]
        self.register_buffer("log_priors", torch.empty(0, dtype=torch.float64))  # [C]

    def extra_repr(self) -> str:
        return f"ridge={self.ridge}"

    def load_moments(self, moments: Moments) -> None:
        super().load_moments(moments)
        inv_evals = self.whitener.square().sum(dim=-2)  # [C, D]: 1 / lambda_j, 0 for dropped eigenvalues
        logs = torch.where(inv_evals > 0, inv_evals.clamp_min(1e-300).log(), torch.zeros_like(inv_evals))
        counts = moments.counts
        priors = torch.where(counts > 0, (counts / counts.sum()).clamp_min(1e-300).log(), -math.inf)
        self._set_buffers(log_det=-logs.sum(dim=-1), log_priors=priors)

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negative mixture log-likelihood; higher = more OOD."""
        d = self.means.shape[1]
        log_lik = self.log_priors - 0.5 * (
            self.class_distances(batch) + self.log_det + d * math.log(2 * math.pi)
        )
        return -torch.logsumexp(log_lik, dim=1).to(batch.features.device)
