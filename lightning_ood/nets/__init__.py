"""Plain ``nn.Module`` networks (no Lightning import)."""

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
