"""One LightningModule per OOD method, and the bases they share."""

from lightning_ood.contract import TestStepOutput
from lightning_ood.methods.base import OODMethod
from lightning_ood.methods.classifier import Classifier
from lightning_ood.methods.diffguard import DiffGuard
from lightning_ood.methods.diffusion import DiffusionModel
from lightning_ood.methods.frozen_encoder import FrozenEncoder
from lightning_ood.methods.heatmap import HeatmapOOD
from lightning_ood.methods.oodformer import OODformer
from lightning_ood.methods.ssod import SSOD
from lightning_ood.methods.supervised import SupervisedMethod

__all__ = [
    "SSOD",
    "Classifier",
    "DiffGuard",
    "DiffusionModel",
    "FrozenEncoder",
    "HeatmapOOD",
    "OODMethod",
    "OODformer",
    "SupervisedMethod",
    "TestStepOutput",
]
