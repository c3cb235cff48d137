"""Gaussian class-conditional detectors: Mahalanobis (tied or per-class covariance) and relative Mahalanobis.

Fitted in one streaming pass of float64 sufficient statistics (see :mod:`gaussian_stats`); no training sample
is stored. Covariances are the maximum-likelihood ones (divided by the sample count, like sklearn's
``EmpiricalCovariance``) and are inverted with a relative ridge and an eigenvalue cut-off (:func:`whitener`):
``Sigma^-1 ~ pinv(Sigma + ridge * (trace(Sigma) / D) * I)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_ood.detectors.base import DetectorInputs
from lightning_ood.detectors.gaussian_stats import MomentDetector, Moments, whitener
from lightning_ood.detectors.memory_guard import check_per_class_memory

Covariance = Literal["tied", "per_class"]


def _check_ridge(ridge: float) -> None:
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")


class Mahalanobis(MomentDetector):
    """Squared Mahalanobis distance to the nearest class: ``min_c (z - mu_c)^T Sigma_c^-1 (z - mu_c)``.

    Higher = more OOD. ``z``: ``[B, D]`` features; returns ``[B]`` float64 scores. The minimum over classes is
    used for every sample (never the ground-truth class).

    - ``covariance="tied"`` (Lee et al., NeurIPS 2018, eq. 1-2): one shared covariance, the pooled
      within-class scatter over ``N``: ``Sigma = 1/N sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T``. This equals
      ``EmpiricalCovariance(assume_centered=True).fit(z - mu_y).covariance_``, and with ``ridge=0`` the
      distance to class ``c`` equals that estimator's ``.mahalanobis(x - mu_c)`` (which returns *squared*
      distances, computed with ``precision_ = pinvh(covariance_)``). Statistics: counts ``[C]``, sums
      ``[C, D]`` and one ``[D, D]`` second moment; memory ``O(C*D + D^2)``.
    - ``covariance="per_class"`` (OODformer's code, Koner et al., BMVC 2021): each class its own covariance
      ``Sigma_c = 1/n_c sum_{y_i = c} (z_i - mu_c)(z_i - mu_c)^T``, i.e.
      ``EmpiricalCovariance().fit(z[y == c]).covariance_``; with ``ridge=0`` the distance equals that
      estimator's ``.mahalanobis(x)``. (OODformer's ``np.cov`` divides by ``n_c - 1``, which scales class
      ``c``'s distances by ``(n_c - 1) / n_c``.) Needs per-class second moments: memory ``O(C*D^2)``. A class
      with fewer samples than dimensions has a singular covariance; the ridge keeps its inverse finite (and
      large off the class's affine hull); a class with zero variance (a single sample) takes the pooled
      covariance's ``trace / D`` as its ridge unit, and is an error with ``ridge=0``. Memory: ``8 C D^2`` bytes
      kept (8.4 GB at C = 1000, D = 1024; 34 GB at D = 2048), about 6x that at the fit's peak: when the fit
      starts (the first batch gives ``C`` and ``D``) this estimate is checked against the memory free on the
      features' device (or ``memory_limit_gb``) and the fit fails at once with the numbers, or warns above
      half of it (:mod:`~lightning_ood.detectors.memory_guard`).

    Args:
        covariance: ``"tied"`` or ``"per_class"``.
        ridge: relative ridge ``eps``: ``eps * trace(Sigma) / D`` is added to the diagonal before inversion;
            eigenvalues below ``D * eps_float64 * max_eigenvalue`` are then dropped (pseudo-inverse), so
            all-zero (dead) dimensions and ``ridge=0`` never give inf/NaN.
        memory_limit_gb: the memory a per-class fit may use; ``None``: what is free on the device when it
            starts.
    """

    def __init__(
        self,
        covariance: Covariance = "tied",
        ridge: float = 1e-6,
        memory_limit_gb: float | None = None,
        name: str | None = None,
    ) -> None:
        if covariance not in ("tied", "per_class"):
            raise ValueError(f"Mahalanobis covariance must be 'tied' or 'per_class', got {covariance!r}")
        _check_ridge(ridge)
        per_class = covariance == "per_class"
        super().__init__(name, second_moment=not per_class, class_second_moment=per_class)
        self.covariance = covariance
        self.ridge = ridge
        self.memory_limit_gb = memory_limit_gb  # not in extra_repr: it does not change the fit
        self._memory_checked = False
        self.register_buffer("means", torch.empty(0, dtype=torch.float64))  # [C, D]
        self.register_buffer("center", torch.empty(0, dtype=torch.float64))  # [D], the training mean
        self.register_buffer(
            "whitener", torch.empty(0, dtype=torch.float64)
        )  # [D, D] tied, [C, D, D] per class
        self.register_buffer(
            "white_means", torch.empty(0, dtype=torch.float64)
        )  # [C, D] tied: (mu_c - center) W

    def extra_repr(self) -> str:
        return f"covariance={self.covariance!r}, ridge={self.ridge}"

    def reset(self) -> None:
        self._memory_checked = False
        super().reset()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        """Accumulate one batch; a per-class fit first checks that its ``[C, D, D]`` statistics fit in memory."""
        if self.covariance == "per_class" and not self._memory_checked and batch.features is not None:
            features, logits = batch.features, batch.logits
            wide = logits is not None and logits.ndim == 2 and logits.shape[0] == features.shape[0]
            classes = logits.shape[1] if wide else int(targets.max()) + 1 if targets.numel() else 1
            dim = features.flatten(1).shape[1]
            check_per_class_memory(classes, dim, features.device, self.name, self.memory_limit_gb)
            self._memory_checked = True
        super().update(batch, targets)

    def load_moments(self, moments: Moments) -> None:
        if self.covariance == "tied":
            w = whitener(moments.within_scatter / moments.count, self.ridge)
            white_means = (moments.means - moments.mean) @ w
        else:
            w = self._class_whiteners(moments)
            white_means = torch.empty(0, dtype=torch.float64)
        self._set_buffers(means=moments.means, center=moments.mean, whitener=w, white_means=white_means)

    def _class_whiteners(self, moments: Moments) -> Tensor:
        """``[C, D, D]`` per-class whiteners; a zero-variance class borrows the pooled scale for its ridge."""
        covs = moments.class_scatter / moments.counts[:, None, None]
        scale = covs.diagonal(dim1=-2, dim2=-1).mean(-1)  # trace / D, [C]
        flat = (scale <= 0).nonzero().flatten().tolist()
        if flat and self.ridge == 0:
            raise ValueError(
                f"class(es) {flat[:10]} have zero covariance (one sample, or identical samples): with "
                "ridge=0 every point would be at distance 0 from them. Use ridge > 0 or covariance='tied'."
            )
        pooled = moments.class_scatter.sum(0).diagonal().mean() / moments.count
        return whitener(covs, self.ridge, torch.where(scale > 0, scale, pooled))

    def class_distances(self, batch: DetectorInputs) -> Tensor:
        """``[B, C]`` float64 squared Mahalanobis distances to every class."""
        if self.covariance == "tied":
            return self._white_class_distances(batch)
        z = self._centered(batch)
        # One [B, D] x [D, D] product per class (in the features' precision, as MomentDetector._product):
        # O(C) matmuls, no [B, C, D] tensor.
        dtype = self._product_dtype(batch)
        mus, whiteners = self.means - self.center, self._fitted_as("whitener", dtype)
        return torch.stack(
            [((z - mu).to(dtype) @ w).double().square().sum(1) for mu, w in zip(mus, whiteners, strict=True)],
            dim=1,
        )

    def score(self, batch: DetectorInputs) -> Tensor:
        return self.class_distances(batch).amin(dim=1).to(batch.features.device)


class RMD(MomentDetector):
    """Relative Mahalanobis distance (Ren et al., 2021, arXiv 2106.09022, Sec. 2): ``min_c MD_c - MD_0``.

    Higher = more OOD (the paper's confidence is ``-min_c RMD_c``). ``MD_c`` is the tied-covariance squared
    Mahalanobis distance of :class:`Mahalanobis` (``covariance="tied"``); ``MD_0(z) = (z - mu_0)^T Sigma_0^-1
    (z - mu_0)`` is the distance under a single "background" Gaussian fitted on all training features:
    ``mu_0`` their mean and ``Sigma_0 = 1/N sum_i (z_i - mu_0)(z_i - mu_0)^T``, i.e.
    ``EmpiricalCovariance().fit(z)`` (with ``ridge=0``, ``MD_0`` is its ``.mahalanobis(z)``). The paper's
    score is ``min_c RMD_c(z)`` with ``RMD_c = MD_c - MD_0``; ``MD_0`` does not depend on ``c``, so it equals
    ``min_c MD_c(z) - MD_0(z)``. ``z``: ``[B, D]``; returns ``[B]`` float64. Statistics: counts ``[C]``, sums
    ``[C, D]`` and one ``[D, D]`` second moment (both covariances derive from it). Scoring takes ``MD_0`` from
    the tied whitened features it shares with :class:`Mahalanobis` plus a rank-``< C`` correction
    (:func:`background_factors`), not from a second ``[D, D]`` product.

    Args:
        ridge: relative ridge for both covariances, as in :class:`Mahalanobis`.
    """

    def __init__(self, ridge: float = 1e-6, name: str | None = None) -> None:
        _check_ridge(ridge)
        super().__init__(name)
        self.ridge = ridge
        self.register_buffer("means", torch.empty(0, dtype=torch.float64))  # [C, D]
        self.register_buffer("center", torch.empty(0, dtype=torch.float64))  # [D], mu_0
        self.register_buffer("whitener", torch.empty(0, dtype=torch.float64))  # [D, D], tied class covariance
        self.register_buffer("white_means", torch.empty(0, dtype=torch.float64))  # [C, D]
        self.register_buffer("background_whitener", torch.empty(0, dtype=torch.float64))  # [D, D], Sigma_0

    def extra_repr(self) -> str:
        return f"ridge={self.ridge}"

    def load_moments(self, moments: Moments) -> None:
        w = whitener(moments.within_scatter / moments.count, self.ridge)
        w0 = whitener(moments.total_scatter / moments.count, self.ridge)
        self._set_buffers(
            means=moments.means,
            center=moments.mean,
            whitener=w,
            white_means=(moments.means - moments.mean) @ w,
            background_whitener=w0,
        )

    def score(self, batch: DetectorInputs) -> Tensor:
        md_class = self._white_class_distances(batch).amin(dim=1)
        return (md_class - self.background_distances(batch)).to(batch.features.device)

    def background_distances(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` float64 ``MD_0``: from the tied whitened features and a rank-``< C`` correction
        (:func:`background_factors`) when that identity holds, else as ``||(z - mu_0) W_0||^2``."""
        factors = self._derived(
            "background_factors",
            lambda: background_factors(self.whitener, self.background_whitener, self.white_means, self.ridge),
        )
        if factors is None:
            return self._product(batch, self._centered(batch), "background_whitener").square().sum(1)
        scale2, basis, core = factors
        y = self._whitened(batch)
        q = y @ basis
        return y.square() @ scale2 + ((q @ core) * q).sum(1)


def background_factors(
    whitener: Tensor, background_whitener: Tensor, white_means: Tensor, ridge: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """RMD's background distance from the tied whitened features ``y = (z - mu_0) W``: ``scale2`` ``[D]``,
    ``basis`` ``[D, C]`` and ``core`` ``[C, C]`` with ``||(z - mu_0) W_0||^2 = y^2 . scale2 + q core q^T``,
    ``q = y basis``; or ``None`` when that identity does not hold (a whitener dropped an eigenvalue) or does not
    save work (``C > D / 2``): then RMD scores with ``W_0`` itself.

    The total covariance is the within-class one plus the between-class scatter (rank ``<= C - 1``, spanned by
    the centred class means ``mu_c - mu_0``). With the relative ridges ``r = ridge * trace / D`` of
    :func:`whitener`: ``Sigma_0 + r_0 I = (Sigma_w + r_w I) + delta I + between``, ``delta = r_0 - r_w >= 0``.
    ``W = V L^-1/2`` (``Sigma_w + r_w I = V L V^T``), so in whitened coordinates ``Sigma_w + r_0 I`` is
    ``diag(L + delta) / L`` (its inverse ``diag(scale2)``, ``scale2 = L / (L + delta)``), and by the Woodbury
    identity the inverse of the total is ``diag(scale2)`` plus a correction within the span of
    ``basis = scale2 * (white means)^T``: ``W^-1 W_0 W_0^T W^-T = diag(scale2) + basis core basis^T``. ``core``
    is that projection, solved with a pseudo-inverse; the identity is checked on every entry (within
    ``D * eps * cond``, the accuracy of the whiteners as inverses) before it is used. So the background
    distance costs ``O(D * C)`` per sample on top of the whitening that Mahalanobis and RMD already share,
    instead of a second ``[D, D]`` product; the factors cost two ``[D, D]`` products once per fit. ``L``,
    ``L_0`` are read off the whiteners' column norms (``||W_:j||^2 = 1 / L_j``), ``W^-1 = diag(L) W^T``, and
    ``trace(Sigma + r I) = (1 + ridge) trace(Sigma)`` gives ``delta``. Float64.
    """
    d, c = whitener.shape[0], white_means.shape[0]
    inv_evals, inv_evals0 = whitener.square().sum(0), background_whitener.square().sum(0)  # 1 / L_j
    if c > d // 2 or not (bool((inv_evals > 0).all()) and bool((inv_evals0 > 0).all())):
        return None
    evals, evals0 = inv_evals.reciprocal(), inv_evals0.reciprocal()
    delta = (ridge * (evals0.sum() - evals.sum()) / (d * (1.0 + ridge))).clamp_min(0.0)
    scale2 = evals / (evals + delta)
    to_white = (whitener * evals).mT @ background_whitener  # W^-1 W_0
    correction = to_white @ to_white.mT - torch.diag(scale2)
    basis = scale2[:, None] * white_means.mT
    inverse = torch.linalg.pinv(basis)
    core = inverse @ correction @ inverse.mT
    core = 0.5 * (core + core.mT)
    cond = max(float(v.max() / v.min()) for v in (inv_evals, inv_evals0))
    if float((correction - basis @ core @ basis.mT).abs().max()) > d * torch.finfo(core.dtype).eps * cond:
        return None
    return scale2, basis, core
