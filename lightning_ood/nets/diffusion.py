"""Diffusion networks on ``diffusers``: the class-conditional UNet we train, and the ``Denoiser`` interface that
DiffGuard runs DDIM through (our UNet, a diffusers pixel UNet, a DiT or a latent model behind its VAE).

Every denoiser works on images in ``[-1, 1]`` (the diffusers convention) and predicts the noise ``eps`` (the
DDPM parametrisation, Ho et al., NeurIPS 2020). ``encode`` / ``decode`` map ``[-1, 1]`` images of the data's
size to the space the network diffuses in (padded pixels, or a VAE's latents) and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import Tensor, nn


def class_conditional_unet(
    num_classes: int,
    in_chans: int = 1,
    sample_size: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_levels: tuple[int, ...] = (),
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A ``diffusers.UNet2DModel`` with ``num_classes + 1`` class embeddings: index ``num_classes`` is the null
    class of classifier-free guidance (Ho & Salimans, 2022).

    Args:
        attention_levels: indices of the resolution levels (0 = full size) that get self-attention blocks.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
    """
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(
            f"block_out_channels {list(block_out_channels)}: every entry must be divisible by norm_num_groups "
            f"({norm_num_groups}); {bad} are not"
        )
    levels = len(block_out_channels)
    if sample_size % (2 ** (levels - 1)):
        raise ValueError(
            f"sample_size {sample_size} must be divisible by 2^{levels - 1} for {levels} resolution levels"
        )
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(levels)))
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_chans,
        out_channels=in_chans,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        attention_head_dim=8,
        num_class_embeds=num_classes + 1,
    )


def pad_to(x: Tensor, size: int) -> Tensor:
    """Pad ``[B, C, h, w]`` images on every side to ``size`` x ``size`` by repeating the border (centred)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h > size or w > size:
        raise ValueError(
            f"images of {h}x{w} px are larger than the diffusion model's sample size {size}; resize the data "
            "(data.image_size) or use a model trained at this size"
        )
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), mode="replicate")


def crop_to(x: Tensor, height: int, width: int) -> Tensor:
    """The centre ``height`` x ``width`` crop of ``[B, C, H, W]`` (undoes :func:`pad_to`)."""
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


#: ``Denoiser.set_execution`` precisions: the autocast dtype of each (``None``: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "32-true": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


class Denoiser(nn.Module):
    """A noise-prediction network and its DDPM noise schedule, as DiffGuard uses it.

    Subclasses implement :meth:`predict_noise`, and :meth:`encode` / :meth:`decode` when they diffuse in another
    space than pixels. DDIM calls :meth:`noise`, which runs :meth:`predict_noise` in the precision and memory
    format :meth:`set_execution` chose (by default: as it is). ``alphas_cumprod`` (``[T]``, the scheduler's
    ``bar alpha_t``) is a buffer.

    Attributes:
        num_classes: classes the network is conditioned on (``0``: unconditional).
        name: a short description for result tables.
        clip_sample: clamp the predicted ``x0`` to ``[-1, 1]`` while regenerating (pixel models; a latent
            space has no such range).
    """

    clip_sample: bool = True

    def __init__(self, alphas_cumprod: Tensor, num_classes: int = 0, name: str = "diffusion") -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().to(torch.float64).clone())
        self.num_classes = num_classes
        self.name = name
        self.autocast_dtype: torch.dtype | None = None
        self.channels_last = False

    def set_execution(self, precision: str = "32-true", channels_last: bool = False) -> Denoiser:
        """How :meth:`noise` runs the network: ``precision`` ``"32-true"`` (its own weights' dtype),
        ``"bf16-mixed"`` or ``"16-mixed"`` (autocast to bfloat16 / float16 around the network only); and
        ``channels_last`` (4-d weights and inputs in NHWC memory order). Returns ``self``."""
        if precision not in PRECISIONS:
            raise ValueError(f"diffusion precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.autocast_dtype = PRECISIONS[precision]
        self.channels_last = bool(channels_last)
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self

    def noise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """:meth:`predict_noise` as :meth:`set_execution` says, ``eps`` returned in ``x``'s dtype (the DDIM
        arithmetic around the network stays in full precision)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self.predict_noise(x, t, labels)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            eps = self.predict_noise(x, t, labels)
        return eps.to(x.dtype)

    @property
    def conditional(self) -> bool:
        """Whether :meth:`predict_noise` takes class labels (classifier-free guidance is possible)."""
        return self.num_classes > 0

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def predict_noise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """``eps(x_t, t, y)``: ``x`` ``[B, ...]`` in the diffused space, ``t`` ``[B]`` integer timesteps, ``labels``
        ``[B]`` classes or ``None`` (unconditional: the null class of a conditional model)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` images in ``[-1, 1]`` -> the space the network diffuses in."""
        return x

    def decode(self, z: Tensor, shape: tuple[int, int, int]) -> Tensor:
        """The diffused space -> ``[B, *shape]`` images (``shape`` = channels, height, width of the data) in
        ``[-1, 1]`` (not clamped)."""
        return z

    def encode_mask(self, mask: Tensor, z: Tensor) -> Tensor:
        """A ``[B, 1, H, W]`` 0 / 1 mask on the images -> the same region in the diffused space of ``z``
        (``[B, 1, h, w]``; nearest-neighbour resizing, as the reference code does for latents)."""
        return F.interpolate(mask, size=tuple(z.shape[-2:]), mode="nearest")


class UNetDenoiser(Denoiser):
    """A ``diffusers.UNet2DModel`` on pixels (ours: class-conditional with a null class; a ``DDIMPipeline``'s:
    unconditional). Images smaller than the UNet's ``sample_size`` are padded by repeating their border and
    cropped back after decoding.

    Args:
        unet: the network; ``num_class_embeds`` (if set) = classes + 1, the last being the null class.
        alphas_cumprod: ``[T]`` the scheduler's ``bar alpha_t``.
    """

    def __init__(self, unet: UNet2DModel, alphas_cumprod: Tensor, name: str = "unet") -> None:
        embeds = unet.config.num_class_embeds
        super().__init__(alphas_cumprod, num_classes=(embeds - 1) if embeds else 0, name=name)
        self.unet = unet
        self.sample_size = int(unet.config.sample_size)

    def predict_noise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if not self.conditional:
            return self.unet(x, t).sample
        if labels is None:
            labels = torch.full((len(x),), self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=labels).sample

    def encode(self, x: Tensor) -> Tensor:
        return pad_to(x, self.sample_size)

    def decode(self, z: Tensor, shape: tuple[int, int, int]) -> Tensor:
        return crop_to(z, shape[1], shape[2])

    def encode_mask(self, mask: Tensor, z: Tensor) -> Tensor:
        return pad_to(mask, self.sample_size)  # the border's value repeated, like the padded image


class LatentDenoiser(Denoiser):
    """A latent diffusion model: a denoiser on a VAE's latents (a ``DiTPipeline``'s transformer, or a latent
    UNet), images going through the VAE (``AutoencoderKL`` or ``VQModel``) with its ``scaling_factor``.

    Args:
        network: ``DiTTransformer2DModel`` / ``Transformer2DModel`` (class-conditional, null class = its
            ``num_embeds_ada_norm``) or ``UNet2DModel`` (unconditional or with class embeddings).
        vae: the autoencoder; latents are its mean / quantised code times ``scaling_factor``.
        image_size: the pixel size the VAE expects (images are resized to it and back).
    """

    clip_sample = False

    def __init__(
        self,
        network: nn.Module,
        vae: nn.Module,
        alphas_cumprod: Tensor,
        image_size: int,
        name: str = "latent",
    ) -> None:
        config = network.config
        if hasattr(config, "num_embeds_ada_norm") and config.get("num_embeds_ada_norm"):
            classes = int(config.num_embeds_ada_norm)  # DiT: labels 0..C-1, C = the null class
        elif config.get("num_class_embeds"):
            classes = int(config.num_class_embeds) - 1
        else:
            classes = 0
        super().__init__(alphas_cumprod, num_classes=classes, name=name)
        self.network = network
        self.vae = vae
        self.image_size = image_size
        self.latent_channels = int(config.in_channels)
        self.scaling_factor = float(vae.config.get("scaling_factor", 1.0))

    def predict_noise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if self.conditional and labels is None:
            labels = torch.full((len(x),), self.num_classes, dtype=torch.long, device=x.device)
        if isinstance(self.network, UNet2DModel):
            out = self.network(x, t, class_labels=labels if self.conditional else None).sample
        else:
            out = self.network(x, timestep=t, class_labels=labels).sample
        # DiT learns the variance too: its first `in_channels` outputs are eps
        return out[:, : self.latent_channels]

    def encode(self, x: Tensor) -> Tensor:
        x = _resize(_to_channels(x, int(self.vae.config.in_channels)), self.image_size)
        encoded = self.vae.encode(x)
        z = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        return z * self.scaling_factor

    def decode(self, z: Tensor, shape: tuple[int, int, int]) -> Tensor:
        images = _resize(self.vae.decode(z / self.scaling_factor).sample, (shape[1], shape[2]))
        return images.mean(dim=1, keepdim=True) if shape[0] == 1 and images.shape[1] != 1 else images


def _resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _to_channels(x: Tensor, channels: int) -> Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(f"images have {x.shape[1]} channels, the diffusion model's autoencoder takes {channels}")
