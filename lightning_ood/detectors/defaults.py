"""The default detector set: every cheap single-pass detector that applies to what a method provides."""

from __future__ import annotations

from lightning_ood.detectors.activation_scaling import DICE, SCALE
from lightning_ood.detectors.activation_shaping import ASH, ReAct
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.class_mean import ClassMeanCosine, ClassMeanEuclidean
from lightning_ood.detectors.head_geometry import FDBD, NCI, SHE, GradNorm
from lightning_ood.detectors.knn import KNN
from lightning_ood.detectors.logit_fits import KLMatching, TemperatureScaledMSP
from lightning_ood.detectors.logits import GEN, MSP, Energy, Entropy, MaxLogit
from lightning_ood.detectors.mahalanobis import RMD, Mahalanobis
from lightning_ood.detectors.residual import Residual
from lightning_ood.detectors.vim import ViM


def default_detectors(provides: frozenset[str]) -> list[Detector]:
    """One instance (paper defaults) of every cheap detector that scores from the test step's single forward pass.

    Left out, opt-in through ``model.detectors`` (README, "Detectors"):

    - more than one pass per batch: ``ODIN``, ``MahalanobisPreprocessed``;
    - intermediate feature maps (a forward pass that returns them, and per-layer fits): ``Gram``, ``RankFeat``,
      ``MultiLayerMahalanobis``;
    - ``O(C * D^2)`` memory: ``Mahalanobis(covariance="per_class")``, ``GMM``;
    - a second feature bank searched per test batch like KNN: ``NNGuide``;
    - fits that keep every training sample: ``OpenMax`` (``N * C`` logits), ``VRA`` (two ReAct percentiles),
      ``LinearProbe``;
    - ``r`` perturbed copies of the head (100): ``WeiPer``, ``WeiPerKLD`` multiply the head's product per batch
      by ``r`` and keep an ``[r, C, D]`` buffer (0.8 GB for ImageNet-1K on ResNet-50), and WeiPerKLD's fit
      keeps the training features (unless its bins are fixed) and projects them twice;
    - ``WeightedEnergy``: without weights learned with VOS it is Energy re-weighted by the class priors (on
      balanced data the same ranking as ``Energy``).
    """
    candidates: list[Detector] = [
        MSP(),
        MaxLogit(),
        Energy(),
        Entropy(),
        GEN(),
        TemperatureScaledMSP(),
        KLMatching(),
        Mahalanobis(),
        RMD(),
        ClassMeanEuclidean(),
        ClassMeanCosine(),
        KNN(),
        ViM(),
        Residual(),
        ReAct(),
        ASH(),
        SCALE(),
        DICE(),
        NCI(),
        FDBD(),
        SHE(),
        GradNorm(),
    ]
    return [d for d in candidates if d.requires <= provides]
