"""The default detector set: every single-pass detector that applies to what a method provides."""

from __future__ import annotations

from lightning_ood.detectors.activation_shaping import ASH, ReAct
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.class_mean import ClassMeanCosine, ClassMeanEuclidean
from lightning_ood.detectors.knn import KNN
from lightning_ood.detectors.logits import GEN, MSP, Energy, Entropy, MaxLogit
from lightning_ood.detectors.mahalanobis import RMD, Mahalanobis
from lightning_ood.detectors.vim import ViM


def default_detectors(provides: frozenset[str]) -> list[Detector]:
    """One instance (paper defaults) of every detector that scores from the test step's single forward pass.

    Left out, opt-in through ``model.detectors``: ``ODIN`` (it runs its own forward/backward/forward pass per
    batch, so it would triple evaluation cost) and ``Mahalanobis(covariance="per_class")`` (O(C*D^2) memory).
    """
    candidates: list[Detector] = [
        MSP(),
        MaxLogit(),
        Energy(),
        Entropy(),
        GEN(),
        Mahalanobis(),
        RMD(),
        ClassMeanEuclidean(),
        ClassMeanCosine(),
        KNN(),
        ViM(),
        ReAct(),
        ASH(),
    ]
    return [d for d in candidates if d.requires <= provides]
