"""ViM: Out-of-distribution with Virtual-logit Matching (Wang et al., CVPR 2022, arXiv 2203.10807)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import DetectorInputs, all_reduce_sum
from lightning_ood.detectors.gaussian_stats import MomentDetector, Moments

_F64 = torch.float64
_CHUNK = 8192  # rows of stored features moved to the device at once when computing alpha


def default_vim_dim(feature_dim: int) -> int:
    """Principal-subspace dimension for ``D``-dimensional features.

    The official code (haoqiwang/vim, ``benchmark.py``) uses 1000 for ``D >= 2048`` (BiT, ResNet-50) and 512
    for the ``D = 768`` transformers; the paper has no backbone below 768, where we use ``D // 2``.
    """
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def head_origin(head: nn.Linear) -> Tensor:
    """``u = -pinv(W) b`` (float64 ``[D]``): the point the head maps to all-zero logits (least squares)."""
    w = head.weight.detach().to(_F64)
    if head.bias is None:
        return w.new_zeros(w.shape[1])
    return -torch.linalg.pinv(w) @ head.bias.detach().to(_F64)


def residual_basis(scatter: Tensor, count: int, offset: Tensor, dim: int) -> Tensor:
    """``R`` ``[D, D - dim]``: the eigenvectors of ``M = sum_i (z_i - u)(z_i - u)^T`` beyond the ``dim`` largest.

    ``M = S + N a a^T`` with ``S`` ``[D, D]`` the scatter about the mean ``g`` (``scatter``), ``N = count`` and
    ``a = g - u`` (``offset``, ``[D]``). Forming ``M`` in float64 (directly or from ``S``) and taking
    ``eigh(M)`` squares the condition number: when ``|a|`` is much larger than the spread of the features
    (e.g. ``|u| = 1e6`` for spread 1), every small eigenvector of ``M`` gets an absolute error of about
    ``eps * |a|^2 / spread^2`` (1e-4 there). Instead ``M = F^T F`` with ``F = [sqrt(N) a^T; (V sqrt(L))^T]``
    ``[D + 1, D]`` (``S = V L V^T``), and the right singular vectors of ``F`` are the eigenvectors of ``M``
    with errors of about ``eps * |a| / spread`` (1e-10 there), the accuracy of an SVD of the centred data.
    """
    evals, evecs = torch.linalg.eigh(0.5 * (scatter + scatter.mT))
    factor = torch.cat([(count**0.5 * offset)[None, :], (evecs * evals.clamp_min(0.0).sqrt()).mT])
    _, _, vh = torch.linalg.svd(factor, full_matrices=False)  # singular values in descending order
    return vh[dim:].mT.contiguous()


class ViM(MomentDetector):
    """Virtual-logit matching: ``alpha * ||(z - u) R|| - logsumexp(logits)`` (higher = more OOD).

    ``z``: ``[B, D]`` features, ``logits``: ``[B, C]``; returns ``[B]`` float64 scores. Following the paper
    and its official code: ``u = -pinv(W) b`` is the origin of the head ``(W, b)``; the principal subspace is
    spanned by the ``dim`` leading eigenvectors of ``1/N sum_i (z_i - u)(z_i - u)^T`` over the ID training
    set (the official ``EmpiricalCovariance(assume_centered=True).fit(z - u)``), and ``R`` ``[D, D - dim]``
    spans the rest; the virtual logit is ``alpha * ||(z - u) R||`` with
    ``alpha = mean_i max_c logit_ic / mean_i ||(z_i - u) R||`` over the training set. The paper's ViM score
    is the softmax probability of the virtual logit, ``e^v / (e^v + sum_c e^{l_c})``, which is monotone in
    ``v - logsumexp(l)``: the official code ranks by ``logsumexp(l) - v`` (ID high); this is its negation.

    Fitting is one streaming pass. The ``[D, D]`` second moment about ``u`` comes from float64 sufficient
    statistics (memory ``O(D^2)``): the scatter about the features' mean ``g`` and ``g - u``, combined without
    cancellation by :func:`residual_basis` (exact also when ``|u|`` dwarfs the spread of the features), and
    the mean max-logit is a running sum. The mean residual norm is not a function of any fixed-size
    statistic (the subspace is only known at the end), so to compute ``alpha`` exactly without a second pass
    over the data each rank **keeps its training features on the CPU in their input dtype** (memory
    ``O(N * D)``: 4 bytes * N * D for float32, e.g. 0.8 GB for 200k x 1000) and computes the residual norms
    in :meth:`finalize`; the per-rank sums are then added across ranks, so nothing is gathered. Pass
    ``alpha`` to fix it instead and store nothing.

    Args:
        dim: dimension of the principal subspace, ``0 < dim < D``; ``None`` picks :func:`default_vim_dim`.
        alpha: fixed scale of the virtual logit; ``None`` (default) fits it as in the paper.
    """

    default_name = "vim"

    requires = frozenset({"logits", "features", "head"})

    def __init__(self, dim: int | None = None, alpha: float | None = None, name: str | None = None) -> None:
        if dim is not None and dim < 1:
            raise ValueError(f"ViM dim must be >= 1 (or None for the default), got {dim}")
        super().__init__(name, classes=False)
        self.dim = dim
        self.alpha = alpha
        self.register_buffer("origin", torch.empty(0, dtype=_F64))  # [D], u
        self.register_buffer("residual_basis", torch.empty(0, dtype=_F64))  # [D, D - dim], R
        self.register_buffer("fitted_alpha", torch.empty(0, dtype=_F64))  # [], alpha
        self._clear()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, alpha={self.alpha}"

    def _clear(self) -> None:
        self._origin: Tensor | None = None
        self._max_logit_sum: Tensor | None = None
        self._stored: list[Tensor] = []

    def reset(self) -> None:
        self._clear()
        super().reset()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        if batch.features is None or batch.head is None:
            raise ValueError(f"detector {self.name!r} (ViM) needs features and the head, got None")
        feats, logits = batch.features.detach(), batch.logits.detach()
        if logits.ndim != 2 or logits.shape[0] != feats.shape[0]:
            raise ValueError(
                f"ViM needs [B, C] logits for the {feats.shape[0]} features, got {tuple(logits.shape)}"
            )
        self._moments.update(feats)
        if self._origin is None:
            self._origin = head_origin(batch.head).to(feats.device)
            self._max_logit_sum = torch.zeros((), dtype=_F64, device=feats.device)
        self._max_logit_sum += logits.to(_F64).amax(dim=1).sum() if logits.shape[0] else 0.0
        if self.alpha is None:
            self._stored.append(feats.to("cpu", copy=True))

    def finalize(self) -> None:
        try:
            super().finalize()  # sums the moments over ranks, then calls load_moments
        finally:
            self._clear()

    def load_moments(self, moments: Moments) -> None:
        d = moments.mean.shape[0]
        dim = self.dim if self.dim is not None else default_vim_dim(d)
        if not 0 < dim < d:
            raise ValueError(f"ViM dim must satisfy 0 < dim < D = {d} (the feature dimension), got {dim}")
        dev = moments.mean.device
        # Every rank has the same head; a rank that saw no batch learns u from the others.
        has = self._origin is not None
        packed = (
            torch.cat([self._origin, torch.ones(1, dtype=_F64, device=dev)])
            if has
            else torch.zeros(d + 1, dtype=_F64, device=dev)
        )
        packed = all_reduce_sum(packed)
        u = packed[:d] / packed[d]
        basis = residual_basis(moments.total_scatter, moments.count, moments.mean - u, dim)
        if self.alpha is None:
            alpha = self._fit_alpha(u, basis)
        else:
            alpha = torch.tensor(float(self.alpha), dtype=_F64, device=dev)
        self._set_buffers(origin=u, residual_basis=basis, fitted_alpha=alpha)

    def _fit_alpha(self, u: Tensor, basis: Tensor) -> Tensor:
        """``alpha = sum_i max_c logit_ic / sum_i ||(z_i - u) R||`` over all ranks' stored features."""
        residual_sum = torch.zeros((), dtype=_F64, device=u.device)
        for feats in self._stored:
            for chunk in feats.split(_CHUNK):
                residual_sum += ((chunk.to(device=u.device, dtype=_F64) - u) @ basis).norm(dim=1).sum()
        max_logit_sum = (
            self._max_logit_sum if self._max_logit_sum is not None else torch.zeros_like(residual_sum)
        )
        sums = all_reduce_sum(torch.stack([max_logit_sum.to(u.device), residual_sum]))
        if sums[1] <= 0:
            raise ValueError(
                "ViM: the ID training features have no component outside the principal subspace (residual "
                "norm 0), so alpha is undefined; lower `dim` or set `alpha`"
            )
        return sums[0] / sums[1]

    def score(self, batch: DetectorInputs) -> Tensor:
        z = self._features(batch, self.origin)
        # (z - u) R as z R - u R: the [B, D] x [D, D - dim] product in the features' precision (see
        # MomentDetector._product) is then of the features themselves, never of z - u, which is large when the
        # origin u is far from the data; u R is float64, computed once per fit.
        origin_residual = self._derived("origin_residual", lambda: self.origin @ self.residual_basis)
        residual = (self._product(batch, z, "residual_basis") - origin_residual).norm(dim=1)
        energy = torch.logsumexp(batch.logits.detach().to(device=z.device, dtype=_F64), dim=1)
        return (self.fitted_alpha * residual - energy).to(batch.features.device)
