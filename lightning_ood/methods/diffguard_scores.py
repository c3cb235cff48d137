"""DiffGuard's similarity measures between a reference image and its label-conditioned regeneration, and the
standardised sum that combines one of them with a library detector. Every score: ``[B]``, higher = more OOD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from lightning_ood.distributed import all_reduce_sum

#: The measures that need no pretrained weights, each its own score ``diffguard_<measure>``.
MEASURES = ("logits", "features", "l2", "ssim")
#: The paper's perceptual distances (piq's DISTS, Ding et al. 2020; LPIPS, Zhang et al. 2018): VGG16 networks
#: whose weights piq downloads once into torch's hub cache (:func:`perceptual_metric`); opt-in.
PERCEPTUAL = ("dists", "lpips")
#: Files each perceptual distance needs in ``torch.hub.get_dir()/checkpoints`` (torchvision's VGG16 + piq's).
PERCEPTUAL_FILES = {
    "dists": ("vgg16-397923af.pth", "dists_weights.pt"),
    "lpips": ("vgg16-397923af.pth", "lpips_weights.pt"),
}
#: Images smaller than this are upsampled (bilinear) for the perceptual distances: VGG16's last compared stage
#: sees 1/16 of the image size.
PERCEPTUAL_MIN_SIZE = 64


def perceptual_metric(name: str) -> nn.Module:
    """piq's ``DISTS`` or ``LPIPS`` (``reduction="none"``), its weights from torch's hub cache (downloaded there
    on first use when a network is available).

    Raises:
        ValueError: an unknown name. RuntimeError: piq is missing, or the weights are neither cached nor
            downloadable (the message names the files and the folder).
    """
    if name not in PERCEPTUAL:
        raise ValueError(f"DiffGuard.perceptual entries must be among {PERCEPTUAL}, got {name!r}")
    try:
        import piq
    except ImportError as err:
        raise RuntimeError(
            f"DiffGuard's {name} distance needs piq: pip install 'lightning-ood[perceptual]'"
        ) from err
    try:
        return (piq.DISTS if name == "dists" else piq.LPIPS)(reduction="none")
    except Exception as err:  # urllib / hub errors when offline without the cached files
        folder = f"{torch.hub.get_dir()}/checkpoints"
        raise RuntimeError(
            f"DiffGuard's {name} distance needs pretrained weights {list(PERCEPTUAL_FILES[name])} in {folder} "
            f"(downloaded once with a network: python -c 'import piq; piq.{name.upper()}()'; or copy the files "
            f"there, or set TORCH_HOME), and could not load them: {err}"
        ) from err


def perceptual_distance(metric: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """``[B]`` distance (higher = more different) between ``[B, C, H, W]`` images in ``[-1, 1]``: mapped to
    ``[0, 1]``, grey repeated to RGB, upsampled to at least :data:`PERCEPTUAL_MIN_SIZE` px."""
    a, b = ((x.float() + 1) / 2 for x in (a, b))
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    short = min(a.shape[-2:])
    if short < PERCEPTUAL_MIN_SIZE:
        size = [round(s * PERCEPTUAL_MIN_SIZE / short) for s in a.shape[-2:]]
        a, b = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (a, b))
    return metric(b.clamp(0, 1), a.clamp(0, 1)).reshape(len(a))


def similarity_scores(
    ref_logits: Tensor,
    ref_features: Tensor | None,
    ref_images: Tensor,
    regen_logits: Tensor,
    regen_features: Tensor | None,
    regen_images: Tensor,
    perceptual: dict[str, nn.Module] | None = None,
) -> dict[str, Tensor]:
    """Dissimilarities between the reference (the input, or its unconditional regeneration) and the regeneration
    under the predicted label.

    Args:
        ref_logits, regen_logits: ``[B, C]`` the protected classifier's logits.
        ref_features, regen_features: ``[B, D]`` its features (``None``: no ``features`` score).
        ref_images, regen_images: ``[B, C, H, W]`` in ``[-1, 1]``.
        perceptual: ``{"dists" | "lpips": piq metric}`` (:func:`perceptual_metric`), each its own score.

    Returns:
        ``diffguard_logits``: L1 distance of the logits (``sum_c |l_c - l'_c|``, the reference code's logits
        distance); ``diffguard_features``: ``1 - cos`` of the classifier's penultimate features (not in the
        reference code); ``diffguard_l2``: root-mean-square pixel difference (``[-1, 1]`` units);
        ``diffguard_ssim``: ``1 - SSIM`` (Gaussian 11 px window, data range 2); ``diffguard_dists`` /
        ``diffguard_lpips``: piq's distances (:func:`perceptual_distance`).
    """
    out = {"diffguard_logits": (ref_logits.float() - regen_logits.float()).abs().sum(dim=1)}
    if ref_features is not None and regen_features is not None:
        cos = F.cosine_similarity(ref_features.float(), regen_features.float(), dim=1)
        out["diffguard_features"] = 1.0 - cos
    a, b = ref_images.float(), regen_images.float()
    out["diffguard_l2"] = (a - b).pow(2).flatten(1).mean(1).sqrt()
    ssim = structural_similarity_index_measure(b, a, data_range=2.0, reduction="none")
    out["diffguard_ssim"] = 1.0 - ssim
    for name, metric in (perceptual or {}).items():
        out[f"diffguard_{name}"] = perceptual_distance(metric, ref_images, regen_images)
    return out


class Standardiser(nn.Module):
    """Mean and standard deviation of named scores over ID validation images (streaming, float64, summed across
    ranks), and the standardised sum of several of them (the combined score).

    Fitted statistics are buffers; the module is left out of checkpoints like a detector.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.register_buffer(
            "moments", torch.zeros(len(names), 3, dtype=torch.float64)
        )  # n, sum, sum of squares
        self.register_buffer("_fitted", torch.tensor(False))

    @property
    def fitted(self) -> bool:
        return bool(self._fitted)

    def reset(self) -> None:
        self.moments.zero_()
        self._fitted.fill_(False)

    def update(self, scores: dict[str, Tensor]) -> None:
        for i, name in enumerate(self.names):
            s = scores[name].detach().to(torch.float64).to(self.moments.device)
            self.moments[i] += torch.stack([s.new_tensor(float(len(s))), s.sum(), s.pow(2).sum()])

    def finalize(self) -> None:
        self.moments.copy_(all_reduce_sum(self.moments.clone()))
        if (self.moments[:, 0] < 2).any():
            raise RuntimeError(
                "standardising DiffGuard's combined score needs at least 2 ID validation images"
            )
        self._fitted.fill_(True)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """``([K], [K])`` per score name (the unbiased standard deviation)."""
        n, total, squares = self.moments.unbind(1)
        mean = total / n
        var = (squares - n * mean.pow(2)) / (n - 1)
        return mean, var.clamp_min(0).sqrt()

    def combined(self, scores: dict[str, Tensor]) -> Tensor:
        """``sum_k (s_k - mean_k) / std_k`` over the names, ``[B]`` (float64)."""
        if not self.fitted:
            raise RuntimeError(
                "the combined DiffGuard score needs ID validation statistics; they are computed when testing starts"
            )
        mean, std = self.mean_std()
        if (std == 0).any():
            zero = [n for n, s in zip(self.names, std.tolist(), strict=True) if s == 0]
            raise RuntimeError(
                f"scores {zero} are constant on the ID validation images: cannot standardise them"
            )
        parts = [(scores[n].to(torch.float64) - mean[i]) / std[i] for i, n in enumerate(self.names)]
        return torch.stack(parts).sum(0)
