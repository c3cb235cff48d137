"""Frozen encoders: images -> embeddings ``[B, D]``, each with the input preprocessing it was trained with.

An :class:`Encoder` is a plain ``nn.Module`` whose ``forward`` takes images already prepared for it and returns
one embedding per image. What "prepared" means is its :class:`InputSpec` (side, resize / crop, interpolation,
channels, mean / std). :func:`prepare_input` turns a batch normalised by the data config into that input,
whatever the data config's normalisation: it undoes the data's ``mean`` / ``std`` (pixels back in [0, 1]),
converts the channels, resizes and centre-crops like the encoder's own eval transform, and normalises with the
encoder's ``mean`` / ``std``. The frozen-encoder method applies it exactly once per forward pass.

- :class:`TimmEncoder`: any timm model by name, from timm's pretrained weights or a local weights file, built
  with ``num_classes=0`` (no classification head: the pooled pre-logit features); its preprocessing is timm's
  ``resolve_model_data_config``.
- :class:`CheckpointEncoder`: the features of a trained lightning-ood method loaded from its checkpoint (e.g. a
  ``Classifier``'s penultimate features); its preprocessing is the normalisation it was trained with.
- :class:`~lightning_ood.nets.clip.ClipEncoder`: an OpenCLIP image tower (optional dependency).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.frozen import load_method
from lightning_ood.nets.timm_net import create_timm_model

_MODES = ("bicubic", "bilinear", "nearest")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class InputSpec:
    """The input an encoder expects, as a transform of an image's pixels in [0, 1].

    Attributes:
        size: side ``S`` of the square input; ``None``: keep the batch's size (no resize).
        crop_pct: timm's eval transform: the shorter side is resized to ``floor(S / crop_pct)``, then the centre
            ``S x S`` is cropped; ``1.0`` (OpenCLIP's ``resize_mode="shortest"``): shorter side to ``S``.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"`` (antialiased when downsampling).
        mean, std: per-channel normalisation of [0, 1] pixels, one value per channel.
        channels: 1 or 3; grey batches are repeated to RGB, RGB batches become grey by ITU-R 601 luma.
    """

    size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    channels: int = 3

    def __post_init__(self) -> None:
        if self.interpolation not in _MODES:
            raise ValueError(
                f"InputSpec.interpolation must be one of {list(_MODES)}, got {self.interpolation!r}"
            )
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"InputSpec: channels must be 1 or 3 with one mean / std per channel, got {self.channels} "
                f"channels, mean {self.mean}, std {self.std}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"InputSpec.crop_pct must be in (0, 1], got {self.crop_pct}")


def per_channel(value: float | list[float] | tuple[float, ...], channels: int) -> tuple[float, ...]:
    """One float per channel from a scalar or a sequence (a scalar is repeated)."""
    values = [value] * channels if isinstance(value, int | float) else list(value)
    if len(values) != channels:
        raise ValueError(f"expected 1 or {channels} values, got {value}")
    return tuple(float(v) for v in values)


def _channels(pixels: Tensor, channels: int) -> Tensor:
    if pixels.shape[1] == channels:
        return pixels
    if channels == 3:
        return pixels.expand(-1, 3, -1, -1)
    weights = pixels.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (pixels * weights).sum(dim=1, keepdim=True)


def _resize_crop(pixels: Tensor, size: int, crop_pct: float, mode: str) -> Tensor:
    height, width = pixels.shape[-2:]
    if (height, width) == (size, size) and crop_pct == 1.0:
        return pixels
    short = math.floor(size / crop_pct)
    scale = short / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new != (height, width):
        smooth = mode != "nearest"
        kwargs: dict[str, Any] = {"align_corners": False, "antialias": True} if smooth else {}
        pixels = F.interpolate(pixels, size=new, mode=mode, **kwargs)
        if mode == "bicubic":  # bicubic overshoots; PIL and torchvision clip to the pixel range as well
            pixels = pixels.clamp(0.0, 1.0)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return pixels[..., top : top + size, left : left + size]


def prepare_input(x: Tensor, data_mean: Tensor, data_std: Tensor, spec: InputSpec) -> Tensor:
    """A batch normalised by the data config -> the encoder's input (applied once, on the batch's device).

    Args:
        x: ``[B, C, H, W]`` images equal to ``(pixels - data_mean) / data_std``, pixels in [0, 1].
        data_mean, data_std: ``[C]`` the data config's normalisation.
        spec: what the encoder expects.

    Returns:
        ``[B, spec.channels, S, S]`` ``(resize_crop(pixels) - spec.mean) / spec.std``. Resizing is done in float on
        the device (close to, not bit-identical with, PIL's resize of uint8 images); bicubic overshoot is
        clamped back into [0, 1].
    """
    view = (1, -1, 1, 1)
    pixels = x * data_std.to(x).view(view) + data_mean.to(x).view(view)
    pixels = _channels(pixels, spec.channels)
    if spec.size is not None:
        pixels = _resize_crop(pixels, spec.size, spec.crop_pct, spec.interpolation)
    mean = pixels.new_tensor(spec.mean).view(view)
    std = pixels.new_tensor(spec.std).view(view)
    return (pixels - mean) / std


class Encoder(nn.Module):
    """Base class of frozen encoders: ``forward(prepared [B, C, S, S]) -> [B, D]`` embeddings.

    Subclasses set ``name`` (tracking: the run's backbone), ``source`` (the local weights file the weights come
    from, or ``None``; its content hash keys cached detector fits) and ``input_spec``.
    """

    name: str
    source: str | None
    input_spec: InputSpec

    def describe(self) -> dict[str, Any]:
        """What decides the embeddings besides the weights file's content (for cache keys and logs)."""
        return {"class": type(self).__qualname__, "name": self.name, "input_spec": asdict(self.input_spec)}


def _local_file(path: str, what: str, hint: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what}={str(file)!r} does not exist: {hint}")
    return file


class TimmEncoder(Encoder):
    """A timm model without classification head (``num_classes=0``): ``[B, D]`` pooled pre-logit features.

    For a ViT that is the [CLS] token (or the pooled tokens) after the final norm, for a CNN the globally pooled
    last feature map. Preprocessing is timm's ``resolve_model_data_config`` of the model (input size,
    interpolation, ``crop_pct``, mean / std); its eval transform is reproduced by :func:`prepare_input`.

    Args:
        name: timm model name, e.g. ``vit_small_patch14_dinov2.lvd142m``, ``convnext_base.fb_in22k``.
        pretrained: load timm's pretrained weights for ``name`` (downloads once into the Hugging Face cache).
        weights_path: a local weights file instead (offline; loaded by timm's pretrained loader).
        image_size: the input side; ``None``: a ViT's ``patch_embed.img_size`` (so ``model_kwargs: {img_size:
            224}`` is followed), else the pretrained config's input size.
        model_kwargs: further ``timm.create_model`` arguments (``img_size``, ``dynamic_img_size``, ...).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights_path: str | None = None,
        image_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if "num_classes" in kwargs:
            raise ValueError(
                "TimmEncoder.model_kwargs: num_classes is fixed to 0 (a frozen encoder has no head)"
            )
        if not pretrained and weights_path is None:
            raise ValueError(
                f"TimmEncoder({name!r}) has no weights: set pretrained: true (timm downloads them once) or "
                "weights_path: <local file>; a randomly initialised network is not a pretrained encoder"
            )
        if weights_path is not None:
            hint = "point it at a local timm / PyTorch weights file (.pth, .bin or .safetensors)"
            weights_path = str(_local_file(weights_path, "TimmEncoder.weights_path", hint))
        in_chans = kwargs.pop("in_chans", 3)
        self.model = create_timm_model(
            name, num_classes=0, in_chans=in_chans, pretrained=pretrained, weights_path=weights_path, **kwargs
        )
        self.name, self.source = name, weights_path
        self.pretrained, self.model_kwargs = pretrained, kwargs
        self.input_spec = timm_input_spec(self.model, image_size, in_chans)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pretrained": self.pretrained, "model_kwargs": self.model_kwargs}


def timm_input_spec(model: nn.Module, image_size: int | None, channels: int) -> InputSpec:
    """The eval preprocessing timm resolves for ``model`` (``image_size`` overrides the side)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    built = getattr(
        getattr(model, "patch_embed", None), "img_size", None
    )  # a ViT's grid (timm keeps the cfg's)
    size = image_size or (built[0] if built else None) or cfg["input_size"][-1]
    interpolation = cfg.get("interpolation", "bicubic")
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != channels:  # a grey model made from RGB weights: the channel average
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return InputSpec(
        size=int(size),
        mean=per_channel(mean, channels),
        std=per_channel(std, channels),
        crop_pct=float(cfg.get("crop_pct", 1.0)) if cfg.get("crop_mode", "center") == "center" else 1.0,
        interpolation=interpolation if interpolation in _MODES else "bicubic",
        channels=channels,
    )


class CheckpointEncoder(Encoder):
    """The ``features`` of a trained lightning-ood method loaded from its checkpoint (frozen).

    For a ``Classifier`` checkpoint these are the penultimate pooled features (its head is never used). The input
    is prepared as the method was trained: the size, channels and mean / std of the data config recorded in the
    checkpoint (``datamodule_hyper_parameters``, written by the CLI); ``mean`` / ``std`` override them.

    Args:
        checkpoint: the method's ``.ckpt`` (e.g. the best checkpoint of ``make demo``,
            ``logs/lightning-ood/<run id>/checkpoints/best-*.ckpt``).
        mean, std: the normalisation the method was trained with, when the checkpoint does not record it.
    """

    def __init__(
        self, checkpoint: str, mean: list[float] | None = None, std: list[float] | None = None
    ) -> None:
        super().__init__()
        hint = (
            "point model.init_args.encoder.init_args.checkpoint at a trained lightning-ood checkpoint, e.g. the "
            "best checkpoint of `make demo` (logs/lightning-ood/<run id>/checkpoints/best-*.ckpt)"
        )
        path = _local_file(checkpoint, "CheckpointEncoder.checkpoint", hint)
        data = torch.load(path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters", {})
        self.method = load_method(path)
        self.name = (
            f"{getattr(self.method, 'method_name', 'method')}:{self.method.hparams.get('backbone', '')}"
        )
        self.source = str(path)
        self.input_spec = _trained_input_spec(data, self.method.hparams, mean, std, str(path))

    def forward(self, x: Tensor) -> Tensor:
        features = self.method.forward_outputs(x).features
        if features is None:
            raise RuntimeError(
                f"{type(self.method).__name__}.forward_outputs gives no features to encode with"
            )
        return features


def _trained_input_spec(
    data: dict[str, Any], hparams: Any, mean: list[float] | None, std: list[float] | None, where: str
) -> InputSpec:
    """A method's input as its training data config prepared it: its channels (the method's ``in_chans``, linked
    from the data), mean / std and ``image_size`` (``None``, the source's native size: no resize)."""
    channels = int(hparams.get("in_chans") or data.get("channels") or 3)
    mean = mean if mean is not None else data.get("mean")
    std = std if std is not None else data.get("std")
    if mean is None or std is None:
        raise ValueError(
            f"{where} does not record the normalisation it was trained with: set "
            "model.init_args.encoder.init_args.mean and .std"
        )
    size = data.get("image_size")
    return InputSpec(
        size=size, mean=per_channel(mean, channels), std=per_channel(std, channels), channels=channels
    )
