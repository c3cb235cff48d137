"""Plain ``nn.Module`` networks (no Lightning import)."""

from lightning_ood.nets.timm_net import TimmNet, create_timm_model

__all__ = ["TimmNet", "create_timm_model"]
