"""OpenOOD v1.5's ResNet-18 classifiers, so that their released checkpoints load as they are.

Two networks, registered with timm when :mod:`lightning_ood.nets` is imported (so ``Classifier(backbone=...,
weights_path=<their best.ckpt>)`` loads them through timm's loader, like any other weights file):

- ``openood_resnet18_32x32`` (CIFAR-10 / CIFAR-100): a ResNet-18 for 32 px inputs. Stem: one 3x3 convolution,
  stride 1, no max-pool; four stages of two basic blocks (64 / 128 / 256 / 512 channels, strides 1 / 2 / 2 / 2);
  a projection shortcut (1x1 convolution + batch norm) where the shape changes; global average pooling; a
  linear head ``fc``. Parameter names are OpenOOD's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
  ``layer2.0.shortcut.0`` / ``.1``, ``fc``), so their state dict loads key for key (strictly).
- ``openood_resnet18_224x224`` (ImageNet-200): OpenOOD's network is torchvision's ResNet-18 unchanged, and
  timm's ResNet-18 has the same layers under the same names (``layer2.0.downsample.0``, ...), so this is timm's
  ResNet with basic blocks ``[2, 2, 2, 2]``.

ImageNet-1K uses torchvision's ResNet-50 (``IMAGENET1K_V1``): timm's ``resnet50`` has its names too, so that
file loads with ``backbone: resnet50`` and ``weights_path``.

The checkpoint's classifier is always kept (the weights define the head for ``num_classes`` classes): a
checkpoint for another class count fails to load with the shapes named, rather than getting a random head.
A ``module.`` prefix (DataParallel) and a ``state_dict`` wrapper are removed by timm's loader.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import ResNet
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; ``shortcut`` is empty or a strided 1x1 projection + batch norm.

    ``[B, in, H, W]`` -> ``[B, planes, H / stride, W / stride]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18x32(nn.Module):
    """OpenOOD's ``ResNet18_32x32`` with timm's interface (``forward_features``, ``forward_head``,
    ``get_classifier``, ``reset_classifier``).

    ``forward_features``: ``[B, C, 32, 32]`` -> ``[B, 512, 4, 4]``; ``forward_head(x, pre_logits=True)``: the
    globally averaged ``[B, 512]`` features; ``forward``: logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.num_classes, self.num_features, self.drop_rate = num_classes, 512, drop_rate
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, strides, in_planes = (64, 128, 256, 512), (1, 2, 2, 2), 64
        for index, (planes, stride) in enumerate(zip(widths, strides, strict=True), start=1):
            blocks = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.avgpool(x).flatten(1)
        x = nn.functional.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate else x
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    return {
        "num_classes": 10 if size == 32 else 200,
        "input_size": (3, size, size),
        "mean": mean,
        "std": std,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "mit",
        "origin_url": "https://github.com/Jingkang50/OpenOOD",
    }


default_cfgs = generate_default_cfgs(
    {
        "openood_resnet18_32x32": _cfg(32, CIFAR_MEAN, CIFAR_STD),
        "openood_resnet18_224x224": _cfg(224, IMAGENET_MEAN, IMAGENET_STD),
    }
)


def _keep_head(kwargs: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The weights file is a whole classifier for ``num_classes`` classes: tell timm's loader to keep its head
    (timm drops a head whose class count differs from the registered default's)."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay["num_classes"] = num_classes
    return {**kwargs, "pretrained_cfg_overlay": overlay}


@register_model
def openood_resnet18_32x32(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """OpenOOD v1.5's CIFAR ResNet-18 (``ResNet18_32x32``), key for key."""
    kwargs = _keep_head(kwargs, num_classes)
    return build_model_with_cfg(
        ResNet18x32, "openood_resnet18_32x32", pretrained, num_classes=num_classes, **kwargs
    )


@register_model
def openood_resnet18_224x224(pretrained: bool = False, num_classes: int = 200, **kwargs: Any) -> nn.Module:
    """OpenOOD v1.5's ImageNet-200 ResNet-18 (``ResNet18_224x224`` = torchvision's ResNet-18), key for key."""
    kwargs = _keep_head(kwargs, num_classes)
    return build_model_with_cfg(
        ResNet,
        "openood_resnet18_224x224",
        pretrained,
        block=TimmBasicBlock,
        layers=(2, 2, 2, 2),
        num_classes=num_classes,
        **kwargs,
    )
