"""The heatmap decoder of Hornauer & Belagiannis (WACV 2023, "Heatmap-based out-of-distribution detection",
arXiv 2211.08115) and the formulas of its loss and score.

Images here are pixels in ``[-1, 1]`` (the paper's convention; :func:`to_unit_range` converts a batch normalised
with any ``mean`` / ``std``). The decoder outputs a heatmap ``h`` with ``x + h ~ target``: ``target = x`` for an
ID image (so ``h ~ 0``) and, for an outlier, the ID training image of its predicted class whose classifier feature
is nearest. The magnitude of ``h`` is the OOD score, and where it is large shows where the image is OOD.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The paper's target weight: ``w = 1 + TARGET_WEIGHT * |target|`` (section 3.2; the official code's
#: ``ase_loss_weighted``).
TARGET_WEIGHT = 5.0


def upsampling_plan(size: int, min_side: int = 4) -> tuple[int, int]:
    """``(start side, number of x2 upsamplings)`` that reach at least ``size`` pixels.

    As many doublings as keep the start side ``>= min_side`` (the DCGAN 4 x 4 start for 32 px: 4 -> 8 -> 16 -> 32;
    28 px: 7 -> 14 -> 28; 224 px: 7 -> ... -> 224). A side that is not a start side times a power of two is reached
    by rounding the start side up and centre-cropping the output (27 px: 7 -> 14 -> 28, cropped to 27).
    """
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    ups = max(0, math.floor(math.log2(size / min_side))) if size >= min_side else 0
    return math.ceil(size / 2**ups), ups


class HeatmapDecoder(nn.Module):
    """DCGAN-style decoder: ``[feature, one-hot class] -> heatmap`` at the input's size and channels.

    ``Linear(D + K -> latent) -> reshape [latent, 1, 1] -> ConvTranspose(kernel s0) to s0 x s0 -> n x
    [ConvTranspose(4, stride 2, padding 1): doubles the side] -> Conv 1 x 1 to the image channels -> tanh``,
    BatchNorm + ReLU after every transposed convolution, no biases in the convolutions (as the official code).
    Widths halve at every doubling and end at ``width`` (CIFAR-10 / ResNet-18 in the paper: latent 100, widths
    512, 256, 128, 64).

    Args:
        feature_dim: ``D``, the classifier's pooled penultimate feature size.
        num_classes: ``K``.
        image_size: side ``S`` of the square heatmap.
        channels: image channels of the heatmap.
        latent_dim: width of the fully connected layer.
        width: channels of the last transposed convolution (doubled for every earlier one).
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        image_size: int,
        channels: int,
        latent_dim: int = 100,
        width: int = 64,
    ) -> None:
        super().__init__()
        if min(feature_dim, num_classes, image_size, channels, latent_dim, width) < 1:
            raise ValueError(
                "HeatmapDecoder sizes must be >= 1: feature_dim, num_classes, image_size, channels, latent_dim, "
                f"width = {feature_dim}, {num_classes}, {image_size}, {channels}, {latent_dim}, {width}"
            )
        self.num_classes, self.image_size, self.latent_dim = num_classes, image_size, latent_dim
        start, ups = upsampling_plan(image_size)
        widths = [width * 2**i for i in range(ups, -1, -1)]  # e.g. [512, 256, 128, 64] for 3 doublings
        self.fc = nn.Linear(feature_dim + num_classes, latent_dim)
        blocks = [_block(latent_dim, widths[0], start, 1, 0)]
        blocks += [_block(a, b, 4, 2, 1) for a, b in itertools.pairwise(widths)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(widths[-1], channels, 1, bias=False)

    def forward(self, features: Tensor, classes: Tensor) -> Tensor:
        """``[B, D]`` normalised features, ``[B]`` class indices -> ``[B, C, S, S]`` heatmap in ``(-1, 1)``."""
        onehot = F.one_hot(classes.long(), self.num_classes).to(features.dtype)
        z = self.fc(torch.cat([features, onehot], dim=1)).view(-1, self.latent_dim, 1, 1)
        h = torch.tanh(self.out(self.blocks(z)))
        return _centre_crop(h, self.image_size)


def _block(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _centre_crop(x: Tensor, size: int) -> Tensor:
    top = (x.shape[-1] - size) // 2
    return x if top == 0 and x.shape[-1] == size else x[..., top : top + size, top : top + size]


def to_unit_range(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Normalised ``[B, C, S, S]`` images (``(p - mean) / std``, ``p`` in ``[0, 1]``) -> ``2p - 1`` in ``[-1, 1]``.

    ``mean`` / ``std``: ``[C]``.
    """
    return (images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)) * 2 - 1


def normalise_features(features: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Min-max normalisation ``(f - low) / (high - low)`` with global scalars from the ID training features."""
    return (features - low) / (high - low).clamp_min(torch.finfo(features.dtype).tiny)


def heatmap_loss(images: Tensor, heatmaps: Tensor, targets: Tensor) -> Tensor:
    """Per-image loss ``sum_pixels w * (x + h - t)^2`` with ``w = 1 + 5 |t|`` (paper, eq. 2); ``[B]``.

    All three are ``[B, C, S, S]`` in ``[-1, 1]`` pixel units. The training loss is its mean over the batch.
    """
    weights = 1 + TARGET_WEIGHT * targets.abs()
    return (weights * (images + heatmaps - targets).square()).flatten(1).sum(dim=1)


def heatmap_score(heatmaps: Tensor) -> Tensor:
    """OOD score ``mean over pixels of max over channels of |h|``, ``[B]``; higher = more OOD."""
    return heatmaps.abs().amax(dim=1).flatten(1).mean(dim=1)
