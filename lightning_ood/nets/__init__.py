"""Plain ``nn.Module`` networks (no Lightning import).

Importing this package registers the small-input ResNets of :mod:`lightning_ood.nets.small_resnet` and OpenOOD's
ResNet-18s (:mod:`lightning_ood.nets.openood_resnet`) with timm.
"""

from lightning_ood.nets import (
    openood_resnet,  # noqa: F401  (registers openood_resnet18_32x32 / _224x224)
    small_resnet,  # noqa: F401  (registers resnet10t_os4, resnet18_os4 with timm)
)
from lightning_ood.nets.clip import ClipEncoder
from lightning_ood.nets.encoders import CheckpointEncoder, Encoder, InputSpec, TimmEncoder, prepare_input
from lightning_ood.nets.timm_net import TimmNet, create_timm_model

__all__ = [
    "CheckpointEncoder",
    "ClipEncoder",
    "Encoder",
    "InputSpec",
    "TimmEncoder",
    "TimmNet",
    "create_timm_model",
    "prepare_input",
]
