"""Class-mean distance detectors of OODformer (Koner et al., BMVC 2021, arXiv 2107.08976).

Euclidean and cosine distance to the class means. Both are fitted in one streaming pass that keeps only
per-class counts ``[C]`` and sums ``[C, D]`` (float64), so memory is ``O(C*D)`` whatever the training set
size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import DetectorInputs
from lightning_ood.detectors.gaussian_stats import MomentDetector, Moments, squared_distances


class ClassMeanEuclidean(MomentDetector):
    """Squared Euclidean distance to the nearest class mean: ``min_c ||z - mu_c||^2`` (higher = more OOD).

    ``z``: ``[B, D]`` features; ``mu_c`` the mean of class ``c``'s ID training features. The minimum over
    classes is used for every sample (never the ground-truth class, which would leak labels). Returns ``[B]``
    float64 scores.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name, second_moment=False)
        self.register_buffer("means", torch.empty(0, dtype=torch.float64))  # [C, D]
        self.register_buffer("center", torch.empty(0, dtype=torch.float64))  # [D], the training mean

    def load_moments(self, moments: Moments) -> None:
        self._set_buffers(means=moments.means, center=moments.mean)

    def score(self, batch: DetectorInputs) -> Tensor:
        # Centring on the training mean keeps the expansion |z|^2 - 2 z.mu + |mu|^2 well conditioned.
        dist = squared_distances(self._centered(batch), self.means - self.center)
        return dist.amin(dim=1).to(batch.features.device)


class ClassMeanCosine(MomentDetector):
    """Negative cosine similarity to the most similar class mean: ``-max_c cos(z, mu_c)`` (higher = more OOD).

    ``z``: ``[B, D]`` raw (uncentred) features; ``mu_c`` the mean of class ``c``'s ID training features (the
    plain mean, as in OODformer's code, not a mean of normalised features). A zero vector has cosine 0 with
    everything. Returns ``[B]`` float64 scores in ``[-1, 1]``.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name, second_moment=False)
        self.register_buffer("means", torch.empty(0, dtype=torch.float64))  # [C, D]

    def load_moments(self, moments: Moments) -> None:
        self._set_buffers(means=moments.means)

    def score(self, batch: DetectorInputs) -> Tensor:
        z = F.normalize(self._features(batch, self.means), dim=1)
        cos = z @ F.normalize(self.means, dim=1).mT
        return -cos.amax(dim=1).to(batch.features.device)
