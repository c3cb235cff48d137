"""One LightningModule per OOD method."""

from lightning_ood.methods.base import OODMethod, TestStepOutput
from lightning_ood.methods.classifier import Classifier

__all__ = ["Classifier", "OODMethod", "TestStepOutput"]
