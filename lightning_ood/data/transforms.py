"""Image conversion and augmentation.

Every set goes through the same two stages:

1. :func:`format_images`, once per set at ``setup`` (or per image for sets decoded lazily from files): uint8
   images of any size and channel count become uint8 ``[N, C, S, S]`` with the ID set's ``C`` channels and
   ``S = image_size`` (grey <-> RGB; alpha dropped; shorter side resized to ``S`` with antialiasing, then a
   centre crop, so the aspect ratio is kept).
2. augmentation of each uint8 image (training and aux outliers only), then, per batch in the DataLoader's
   ``collate_fn`` (:class:`NormalizeCollate`), scaling to [0, 1] and normalisation with ``mean``/``std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF


def to_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> ``[N, channels, H, W]`` for ``channels`` in {1, 3}.

    A 4th (alpha) channel, or the 2nd of a grey+alpha image, is dropped; RGB -> grey uses ITU-R 601 luma.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    images = images[:, :1] if images.shape[1] == 2 else images[:, :3]
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1)
    return TF.rgb_to_grayscale(images, num_output_channels=1)


def format_images(images: Tensor, channels: int, size: int, chunk: int = 2048) -> Tensor:
    """uint8 ``[N, C, H, W]`` images -> contiguous uint8 ``[N, channels, size, size]``; see module doc."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, C, H, W] images, got {images.dtype} {list(images.shape)}")
    if images.shape[1] == channels and images.shape[2:] == (size, size):
        return images.contiguous()
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):  # chunks bound the float memory of the resize
        part = to_channels(images[start : start + chunk], channels)
        if part.shape[2:] != (size, size):
            part = TF.center_crop(TF.resize(part, size, antialias=True), [size, size])
        out[start : start + chunk] = part
    return out


class RandomCropFlip(nn.Module):
    """Zero-pad by ``padding``, take a random ``size`` crop, flip horizontally with probability 1/2.

    The same as ``v2.RandomCrop(size, padding=padding)`` + ``v2.RandomHorizontalFlip()`` on a plain uint8
    ``[C, H, W]`` tensor, without v2's per-call dispatch (about 10x less CPU per image: the default
    augmentation runs on every training image of every epoch). Draws from torch's RNG, so DataLoader worker
    seeding applies.
    """

    def __init__(self, size: int, padding: int = 0) -> None:
        super().__init__()
        self.size, self.padding = size, padding

    def forward(self, image: Tensor) -> Tensor:
        p, s = self.padding, self.size
        image = nn.functional.pad(image, (p, p, p, p)) if p else image
        top, left, flip = torch.randint(2**30, (3,)).tolist()  # one draw: cheaper than three
        top, left = top % (image.shape[-2] - s + 1), left % (image.shape[-1] - s + 1)
        image = image[..., top : top + s, left : left + s]
        return image.flip(-1) if flip % 2 else image

    def extra_repr(self) -> str:
        return f"size={self.size}, padding={self.padding}"


def default_augmentation(image_size: int) -> list[nn.Module]:
    """Random crop with zero padding of ``image_size // 8`` pixels, then a random horizontal flip."""
    return [RandomCropFlip(image_size, padding=image_size // 8)]


class NormalizeCollate:
    """DataLoader ``collate_fn``: stack ``(image, target)`` samples and normalise the whole batch at once.

    Images are uint8 ``[C, S, S]`` (scaled by 1/255) or float already in [0, 1]; the batch is float
    ``[B, C, S, S]`` equal to ``(x - mean) / std``, targets long ``[B]``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, samples: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images = torch.stack([image for image, _ in samples])
        scaled = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        return scaled.sub_(self.mean).div_(self.std), torch.stack([target for _, target in samples]).long()
