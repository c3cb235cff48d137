"""Post-hoc OOD detectors. Every detector returns ``[B]`` scores, higher = more likely OOD."""

from lightning_ood.detectors.activation_scaling import DICE, SCALE, VRA
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
from lightning_ood.detectors.feature_maps import Gram, MultiLayerMahalanobis, RankFeat
from lightning_ood.detectors.gmm import GMM
from lightning_ood.detectors.head_geometry import FDBD, NCI, SHE, GradNorm
from lightning_ood.detectors.input_preprocessing import MahalanobisPreprocessed
from lightning_ood.detectors.knn import KNN
from lightning_ood.detectors.linear_probe import LinearProbe
from lightning_ood.detectors.logit_fits import KLMatching, TemperatureScaledMSP, WeightedEnergy
from lightning_ood.detectors.logits import GEN, MSP, Energy, Entropy, MaxLogit
from lightning_ood.detectors.mahalanobis import RMD, Mahalanobis
from lightning_ood.detectors.nn_guide import NNGuide
from lightning_ood.detectors.odin import ODIN
from lightning_ood.detectors.openmax import OpenMax
from lightning_ood.detectors.residual import Residual
from lightning_ood.detectors.vim import ViM
from lightning_ood.detectors.weiper import WeiPer, WeiPerKLD

__all__ = [
    "ASH",
    "CONSUMABLES",
    "DICE",
    "FDBD",
    "GEN",
    "GMM",
    "KNN",
    "MSP",
    "NCI",
    "ODIN",
    "RMD",
    "SCALE",
    "SHE",
    "VRA",
    "ClassMeanCosine",
    "ClassMeanEuclidean",
    "Detector",
    "DetectorInputs",
    "Energy",
    "Entropy",
    "GradNorm",
    "Gram",
    "KLMatching",
    "LinearProbe",
    "Mahalanobis",
    "MahalanobisPreprocessed",
    "MaxLogit",
    "ModelOutputs",
    "MultiLayerMahalanobis",
    "NNGuide",
    "OpenMax",
    "RankFeat",
    "ReAct",
    "Residual",
    "ScoringModel",
    "TemperatureScaledMSP",
    "ViM",
    "WeiPer",
    "WeiPerKLD",
    "WeightedEnergy",
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_sum",
]
