"""Post-hoc OOD detectors. Every detector returns ``[B]`` scores, higher = more likely OOD."""

from lightning_ood.detectors.activation_shaping import ASH, ReAct
from lightning_ood.detectors.base import (
    CONSUMABLES,
    Detector,
    DetectorInputs,
    ModelOutputs,
    ScoringModel,
    all_gather_cat,
    all_reduce_max,
    all_reduce_sum,
)
from lightning_ood.detectors.class_mean import ClassMeanCosine, ClassMeanEuclidean
from lightning_ood.detectors.knn import KNN
from lightning_ood.detectors.linear_probe import LinearProbe
from lightning_ood.detectors.logits import GEN, MSP, Energy, Entropy, MaxLogit
from lightning_ood.detectors.mahalanobis import RMD, Mahalanobis
from lightning_ood.detectors.odin import ODIN
from lightning_ood.detectors.vim import ViM

__all__ = [
    "ASH",
    "CONSUMABLES",
    "GEN",
    "KNN",
    "MSP",
    "ODIN",
    "RMD",
    "ClassMeanCosine",
    "ClassMeanEuclidean",
    "Detector",
    "DetectorInputs",
    "Energy",
    "Entropy",
    "LinearProbe",
    "Mahalanobis",
    "MaxLogit",
    "ModelOutputs",
    "ReAct",
    "ScoringModel",
    "ViM",
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_sum",
]
