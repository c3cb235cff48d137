"""Residual: the norm of the features outside the ID principal subspace (ViM's virtual logit without logits)."""

from __future__ import annotations

from torch import Tensor

from lightning_ood.detectors.base import DetectorInputs
from lightning_ood.detectors.vim import ViM


class Residual(ViM):
    """Residual score (Wang et al., CVPR 2022, "ViM: Out-of-distribution with virtual-logit matching", the
    "Residual" baseline of Sec. 4): ``||(z - u) R||`` (higher = more OOD).

    ``u = -pinv(W) b`` and the residual basis ``R`` ``[D, D - dim]`` are fitted exactly as for
    :class:`~lightning_ood.detectors.ViM` (one streaming pass, ``O(D^2)`` float64 statistics); no ``alpha`` is
    needed, so no training feature is stored. ``z``: ``[B, D]`` features; returns ``[B]`` float64.

    Args:
        dim: principal-subspace dimension, ``0 < dim < D``; ``None``: ViM's rule
            (:func:`~lightning_ood.detectors.vim.default_vim_dim`).
    """

    default_name = "residual"

    def __init__(self, dim: int | None = None, name: str | None = None) -> None:
        super().__init__(dim=dim, alpha=1.0, name=name)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def score(self, batch: DetectorInputs) -> Tensor:
        z = self._features(batch, self.origin)
        origin_residual = self._derived("origin_residual", lambda: self.origin @ self.residual_basis)
        residual = self._product(batch, z, "residual_basis") - origin_residual
        return residual.norm(dim=1).to(batch.features.device)
