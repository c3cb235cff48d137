"""timm ResNets for small images: total stride 4, so a 28 px input leaves a 7 x 7 final feature map.

A stock ImageNet ResNet downsamples 32 times (a stride-2 stem convolution, a stride-2 max-pool, three stride-2
stages): Fashion-MNIST's 28 px become a 1 x 1 map and CIFAR's 32 px too, which leaves nothing to sample
locations from (SSOD, :mod:`lightning_ood.methods.ssod`). The models registered here are timm's own ResNets
with two changes and no new layers or weights:

- the stem's max-pool is removed (stem stride 4 -> 2), as in the usual CIFAR ResNets;
- timm's ``output_stride=8`` (stage 2 keeps its stride, stages 3 and 4 are dilated instead of strided).

Total stride: 2 (stem) x 2 (stage 2) = 4, so 28 px -> 7 x 7 and 32 px -> 8 x 8 on the final map, and every
timm feature (``pretrained`` / ``weights_path`` of the stock network, ``channels``, ``drop_rate``, ...) still
applies. The models are registered with timm when :mod:`lightning_ood.nets` is imported, so they are usable by
name wherever a timm name is (``Classifier``, ``SSOD``, ``timm.create_model``):

============== ================ =================== ===================
name           stock network    map on 28 px input  map on 32 px input
============== ================ =================== ===================
resnet10t_os4  ``resnet10t``    7 x 7 (512 ch.)     8 x 8 (512 ch.)
resnet18_os4   ``resnet18``     7 x 7 (512 ch.)     8 x 8 (512 ch.)
============== ================ =================== ===================

``resnet10t_os4_half`` is ``resnet10t_os4`` at half width (stages of 32 / 64 / 128 / 256 channels, 1.3M
parameters, a 7 x 7 map of 256 channels on 28 px): about a third of its compute, trained from scratch only (no
stock weights have its shape). It is the network of the reference recipe (``configs/reference_*.yaml``).

The price is compute: stages 3 and 4 run on 7 x 7 instead of 2 x 2 and 1 x 1 maps (resnet10t_os4 costs about
three times resnet10t per 28 px image on a CPU).
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import register_model
from torch import nn

#: Total stride of the registered networks (input side / final map side).
TOTAL_STRIDE = 4


def stride4_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's ``variant`` ResNet with total stride 4: no stem max-pool, ``output_stride=8``.

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``in_chans``, ``channels``, ``drop_rate``,
    ``pretrained_cfg_overlay``, ...); ``output_stride`` is fixed and may not be given.
    """
    if "output_stride" in kwargs:
        raise ValueError(
            f"{variant}_os4 has a fixed total stride of {TOTAL_STRIDE}; remove output_stride from the "
            f"backbone kwargs (for other strides use the stock {variant!r} with output_stride 8, 16 or 32)"
        )
    model = timm.create_model(variant, pretrained=pretrained, output_stride=8, **kwargs)
    model.maxpool = nn.Identity()  # stride-free: no weights change, so the stock weights still load
    return model


@register_model
def resnet10t_os4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``resnet10t`` (tiered deep stem, one block per stage) with total stride 4: 28 px -> a 7 x 7 map."""
    return stride4_resnet("resnet10t", pretrained, **kwargs)


@register_model
def resnet18_os4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``resnet18`` with total stride 4: 32 px -> an 8 x 8 map."""
    return stride4_resnet("resnet18", pretrained, **kwargs)


#: Stage widths of the half-width variant (the stock networks use 64 / 128 / 256 / 512).
HALF_CHANNELS = (32, 64, 128, 256)


@register_model
def resnet10t_os4_half(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``resnet10t_os4`` at half width (:data:`HALF_CHANNELS`): 28 px -> a 7 x 7 map of 256 channels."""
    if pretrained:
        raise ValueError(
            "resnet10t_os4_half has no pretrained weights (its layers are half as wide as resnet10t's); use "
            "pretrained=false, or resnet10t_os4 for the stock resnet10t weights"
        )
    if "channels" in kwargs:
        raise ValueError("resnet10t_os4_half fixes its channels; use resnet10t_os4 with channels=... instead")
    return stride4_resnet("resnet10t", False, channels=HALF_CHANNELS, **kwargs)
