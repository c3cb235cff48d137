"""DiffGuard's similarity measures between a reference image and its label-conditioned regeneration, and the
standardised sum that combines one of them with a library detector. Every score: ``[B]``, higher = more OOD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from lightning_ood.distributed import all_reduce_sum

#: The measures, each its own score ``diffguard_<measure>`` (the paper's DISTS / LPIPS need pretrained VGG
#: weights; these need none).
MEASURES = ("logits", "features", "l2", "ssim")


def similarity_scores(
    ref_logits: Tensor,
    ref_features: Tensor | None,
    ref_images: Tensor,
    regen_logits: Tensor,
    regen_features: Tensor | None,
    regen_images: Tensor,
) -> dict[str, Tensor]:
    """Dissimilarities between the reference (the input, or its unconditional regeneration) and the regeneration
    under the predicted label.

    Args:
        ref_logits, regen_logits: ``[B, C]`` the protected classifier's logits.
        ref_features, regen_features: ``[B, D]`` its features (``None``: no ``features`` score).
        ref_images, regen_images: ``[B, C, H, W]`` in ``[-1, 1]``.

    Returns:
        ``diffguard_logits``: Euclidean distance of the logits; ``diffguard_features``: ``1 - cos`` of the
        features; ``diffguard_l2``: root-mean-square pixel difference (``[-1, 1]`` units); ``diffguard_ssim``:
        ``1 - SSIM`` (Gaussian 11 px window, data range 2).
    """
    out = {"diffguard_logits": (ref_logits.float() - regen_logits.float()).norm(dim=1)}
    if ref_features is not None and regen_features is not None:
        cos = F.cosine_similarity(ref_features.float(), regen_features.float(), dim=1)
        out["diffguard_features"] = 1.0 - cos
    a, b = ref_images.float(), regen_images.float()
    out["diffguard_l2"] = (a - b).pow(2).flatten(1).mean(1).sqrt()
    ssim = structural_similarity_index_measure(b, a, data_range=2.0, reduction="none")
    out["diffguard_ssim"] = 1.0 - ssim
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
