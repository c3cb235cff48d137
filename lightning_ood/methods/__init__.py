"""One LightningModule per OOD method."""

from lightning_ood.methods.base import OODMethod, TestStepOutput
from lightning_ood.methods.classifier import Classifier
from lightning_ood.methods.oodformer import OODformer
from lightning_ood.methods.schedules import WarmupOneCycleLR

__all__ = ["Classifier", "OODMethod", "OODformer", "TestStepOutput", "WarmupOneCycleLR"]
