"""Streaming class statistics (float64) and the linear algebra shared by the Gaussian / class-mean detectors.

:class:`StreamingMoments` accumulates, one ID-training batch at a time and without storing samples, the
per-class counts ``[C]``, per-class sums ``[C, D]``, the total second moment ``[D, D]`` and (optionally) the
per-class second moments ``[C, D, D]``. Memory is ``O(C*D + D^2)`` (``O(C*D^2)`` with per-class moments)
whatever the number of samples. Everything is accumulated around a *shift* (the first batch's mean), which is
exact algebraically and avoids the catastrophic cancellation of ``sum z z^T - N mu mu^T`` for features with a
large mean. :meth:`StreamingMoments.finalize` moves every rank's statistics to the global mean, sums them
across ranks and derives the class means and scatter matrices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs, all_reduce_max, all_reduce_sum
from lightning_ood.precision import at_least_float32_dtype

_F64 = torch.float64


@dataclass(frozen=True)
class Moments:
    """Finalised statistics of the ID training features, float64, summed over all ranks.

    Attributes:
        count: ``N``, the number of samples.
        counts: ``[C]`` samples per class (``C = 1`` when classes are not tracked).
        means: ``[C, D]`` class means ``mu_c``.
        mean: ``[D]`` the mean of all samples ``mu_0``.
        total_scatter: ``[D, D]`` ``sum_i (z_i - mu_0)(z_i - mu_0)^T``, or ``None`` if not tracked.
        within_scatter: ``[D, D]`` pooled within-class scatter ``sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T``,
            or ``None`` if not tracked.
        class_scatter: ``[C, D, D]`` ``sum_{i: y_i = c} (z_i - mu_c)(z_i - mu_c)^T``, or ``None``.
    """

    count: int
    counts: Tensor
    means: Tensor
    mean: Tensor
    total_scatter: Tensor | None
    within_scatter: Tensor | None
    class_scatter: Tensor | None


def _symmetric(m: Tensor) -> Tensor:
    return 0.5 * (m + m.mT)


class StreamingMoments:
    """Float64 streaming first and second moments of features, overall and per class.

    Args:
        classes: track per-class counts and sums (needs ``targets``); otherwise all samples form one class.
        second_moment: track the ``[D, D]`` second moment (total and within-class scatter).
        class_second_moment: also track per-class ``[C, D, D]`` second moments (per-class scatter).
    """

    def __init__(
        self, *, classes: bool = True, second_moment: bool = True, class_second_moment: bool = False
    ):
        self.classes = classes
        self.second_moment = second_moment or class_second_moment
        self.class_second_moment = class_second_moment
        self.reset()

    def reset(self) -> None:
        self.shift: Tensor | None = None  # [D]
        self.counts: Tensor | None = None  # [C]
        self.sums: Tensor | None = None  # [C, D], of z - shift
        self.second: Tensor | None = None  # [D, D], of z - shift
        self.class_second: Tensor | None = None  # [C, D, D], of z - shift

    def _grow(self, num_classes: int) -> None:
        """Zero-pad the per-class statistics to ``num_classes`` rows."""
        old = self.counts.shape[0]
        if num_classes <= old:
            return
        extra = num_classes - old
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])
        if self.class_second is not None:
            d = self.class_second.shape[-1]
            self.class_second = torch.cat([self.class_second, self.class_second.new_zeros(extra, d, d)])

    def _init(self, shift: Tensor, num_classes: int) -> None:
        d = shift.shape[0]
        self.shift = shift
        self.counts = shift.new_zeros(num_classes)
        self.sums = shift.new_zeros(num_classes, d)
        self.second = shift.new_zeros(d, d) if self.second_moment else None
        self.class_second = shift.new_zeros(num_classes, d, d) if self.class_second_moment else None

    def _labels(
        self, targets: Tensor | None, n: int, device: torch.device, num_classes: int | None
    ) -> tuple[Tensor, int]:
        """``[n]`` class indices and the number of classes they imply (one host sync per batch)."""
        if not self.classes:
            return torch.zeros(n, dtype=torch.long, device=device), 1
        if targets is None:
            raise ValueError("class statistics need class labels (targets), got None")
        t = targets.detach().to(device=device, dtype=torch.long).reshape(-1)
        if t.numel() != n:
            raise ValueError(f"got {t.numel()} targets for {n} feature vectors")
        if n == 0:
            return t, num_classes or 0
        lo, hi = torch.stack([t.min(), t.max()]).tolist()
        if lo < 0:
            raise ValueError(
                "class statistics need class labels >= 0 for every training sample (got -1: no labels?)"
            )
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"target {hi} is out of range for {num_classes} classes (logits width)")
        return t, max(hi + 1, num_classes or 0)

    def update(self, features: Tensor, targets: Tensor | None = None, num_classes: int | None = None) -> None:
        """Accumulate one batch: ``features`` ``[B, D]``, ``targets`` ``[B]`` class indices.

        ``num_classes`` (e.g. the logits' width) fixes ``C`` so that a class absent from the training data is
        detected; otherwise ``C`` is the largest target seen (on any rank) plus one.
        """
        if features.ndim != 2:
            raise ValueError(f"features must have shape [B, D], got {tuple(features.shape)}")
        x = features.detach().to(_F64)
        n = x.shape[0]
        t, c = self._labels(targets, n, x.device, num_classes)
        if n == 0:
            return
        if self.shift is None:
            self._init(x.mean(dim=0), c)
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(
                f"feature dimension changed from {self.shift.shape[0]} to {x.shape[1]} during fitting"
            )
        self._grow(c)
        x = x - self.shift
        self.counts += torch.bincount(t, minlength=self.counts.shape[0]).to(_F64)
        self.sums.index_add_(0, t, x)
        if self.second is not None:
            self.second.addmm_(x.mT, x)
        if self.class_second is not None:
            for cls in t.unique().tolist():
                xc = x[t == cls]
                self.class_second[cls].addmm_(xc.mT, xc)

    def finalize(self, device: torch.device | None = None) -> Moments:
        """Sum the statistics over ranks (collective: every rank must call it) and derive means and scatters.

        ``device`` is where a rank that saw no batch creates its zero statistics (the detector's device).
        """
        has_data = self.shift is not None
        dev = self.shift.device if has_data else (device or torch.device("cpu"))
        local_shape = [self.counts.shape[0], self.shift.shape[0]] if has_data else [0, 0]
        c, d = all_reduce_max(torch.tensor(local_shape, dtype=torch.long, device=dev)).tolist()
        if d == 0:
            raise ValueError(
                "no training features were seen: call update() with at least one non-empty batch"
            )
        if has_data and local_shape[1] != d:
            raise ValueError(f"feature dimension differs across ranks ({local_shape[1]} here, {d} elsewhere)")
        if not has_data:
            self._init(torch.zeros(d, dtype=_F64, device=dev), c)
        self._grow(c)

        # Re-centre every rank's statistics on the global mean g (exact: z - g = (z - shift) + delta).
        n_local = self.counts.sum()
        raw_sum = self.sums.sum(0) + n_local * self.shift
        total = all_reduce_sum(torch.cat([n_local.reshape(1), raw_sum]))
        n_total = float(total[0])
        g = total[1:] / n_total
        delta = self.shift - g
        sums = self.sums + self.counts[:, None] * delta
        second = class_second = None
        if self.second is not None:
            cross = torch.outer(self.sums.sum(0), delta)
            second = self.second + cross + cross.mT + n_local * torch.outer(delta, delta)
        if self.class_second is not None:
            cross = self.sums[:, :, None] * delta[None, None, :]
            class_second = (
                self.class_second + cross + cross.mT + self.counts[:, None, None] * torch.outer(delta, delta)
            )

        counts = all_reduce_sum(self.counts.clone())
        sums = all_reduce_sum(sums)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"class(es) {empty[:10]} have no training samples (C = {c}, from the logits' width or the "
                "largest target); every class needs at least one sample to have a mean"
            )
        centred_means = sums / counts[:, None]  # mu_c - g
        total_scatter = within = class_scatter = None
        if second is not None:
            total_scatter = _symmetric(all_reduce_sum(second))
            within = _symmetric(total_scatter - centred_means.mT @ sums)
        if class_second is not None:
            class_second = all_reduce_sum(class_second)
            class_scatter = _symmetric(class_second - sums[:, :, None] * centred_means[:, None, :])
        return Moments(
            count=round(n_total),
            counts=counts,
            means=g + centred_means,
            mean=g,
            total_scatter=total_scatter,
            within_scatter=within,
            class_scatter=class_scatter,
        )


# -- linear algebra ------------------------------------------------------------------------------------------
def whitener(cov: Tensor, ridge: float, scale: Tensor | None = None) -> Tensor:
    """``W`` with ``W W^T = pinv(cov + ridge * trace(cov) / D * I)``; ``||x W||^2`` is a Mahalanobis distance.

    ``cov``: ``[..., D, D]`` symmetric PSD, float64. The *relative* ridge makes the inverse scale-invariant
    and keeps it finite for rank-deficient covariances (dead feature dimensions, a class with fewer samples
    than dimensions). The inverse itself is a pseudo-inverse from a symmetric eigendecomposition: eigenvalues
    at or below ``D * eps_float64 * max_eigenvalue`` (``scipy.linalg.pinvh``'s default cut-off) are dropped,
    so for a PSD ``cov`` ``ridge = 0`` gives ``pinvh(cov)`` (sklearn's ``EmpiricalCovariance.precision_``) and
    an all-zero covariance gives ``W = 0`` rather than inf/NaN. ``scale`` ``[...]`` replaces
    ``trace(cov) / D`` as the ridge's unit. Returns ``[..., D, D]``.
    """
    d = cov.shape[-1]
    cov = _symmetric(cov)
    if scale is None:
        scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1)
    reg = cov + (ridge * scale)[..., None, None] * torch.eye(d, dtype=cov.dtype, device=cov.device)
    evals, evecs = torch.linalg.eigh(reg)
    cutoff = d * torch.finfo(evals.dtype).eps * evals.abs().amax(dim=-1, keepdim=True)
    keep = evals > cutoff
    inv_sqrt = torch.where(
        keep, evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt(), torch.zeros_like(evals)
    )
    return evecs * inv_sqrt[..., None, :]


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """``[B, C]`` squared Euclidean distances between rows of ``x`` ``[B, K]`` and ``centers`` ``[C, K]``.

    Expansion ``|x|^2 - 2 x.c + |c|^2`` (no ``[B, C, K]`` tensor); callers pass float64 inputs centred on the
    training mean, which keeps the cancellation error far below the distances; clamped at 0.
    """
    d = x.square().sum(1, keepdim=True) - 2.0 * (x @ centers.mT) + centers.square().sum(1)
    return d.clamp_min(0.0)


# -- base class of the detectors fitted from Moments --------------------------------------------------------
class MomentDetector(Detector):
    """A detector fitted from :class:`Moments` of the ID training features (one streaming pass).

    Subclasses choose which statistics to track (constructor flags) and implement :meth:`load_moments`, which
    turns the finalised moments into fitted buffers. Accumulated statistics are plain attributes (not saved);
    only the fitted buffers go into checkpoints. Scoring is float64 except the ``[B, D] x [D, K]`` products,
    which run in the features' precision (:meth:`_product`).
    """

    requires = frozenset({"features"})
    needs_fit = True

    def __init__(
        self,
        name: str | None = None,
        *,
        classes: bool = True,
        second_moment: bool = True,
        class_second_moment: bool = False,
    ) -> None:
        super().__init__(name)
        self._moments = StreamingMoments(
            classes=classes, second_moment=second_moment, class_second_moment=class_second_moment
        )

    def reset(self) -> None:
        self._moments.reset()
        self._forget_derived()
        super().reset()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        if batch.features is None:
            raise ValueError(f"detector {self.name!r} needs features, got None")
        logits = batch.logits
        n = batch.features.shape[0]
        num_classes = (
            logits.shape[1] if logits is not None and logits.ndim == 2 and logits.shape[0] == n else None
        )
        self._moments.update(batch.features, targets, num_classes)

    def finalize(self) -> None:
        moments = self._moments.finalize(device=self._fitted.device)
        self._moments.reset()  # free the accumulators
        self.load_moments(moments)
        self._forget_derived()
        super().finalize()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._forget_derived()  # new fitted buffers: new content keys, casts and factors
        super()._load_from_state_dict(*args, **kwargs)

    def _forget_derived(self) -> None:
        self._content_keys: dict[str, str] = {}
        self._derived_values: dict[tuple, object] = {}

    def load_moments(self, moments: Moments) -> None:
        """Compute the fitted buffers from the finalised moments."""
        raise NotImplementedError

    def _set_buffers(self, **tensors: Tensor) -> None:
        for key, value in tensors.items():
            setattr(self, key, value.to(self._fitted.device))

    def _features(self, batch: DetectorInputs, like: Tensor) -> Tensor:
        """``[B, D]`` features as float64 on ``like``'s device (computed once per batch for all detectors)."""
        if batch.features is None:
            raise ValueError(f"detector {self.name!r} needs features, got None")
        device = like.device
        return batch.shared(
            ("features64", str(device)), lambda: batch.features.detach().to(device=device, dtype=_F64)
        )

    def _derived(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` of the fitted buffers, cached until the next fit or load (per device)."""
        values = self.__dict__.setdefault("_derived_values", {})
        key = (name, str(self._fitted.device))
        if key not in values:
            values[key] = compute()
        return values[key]

    def _product(self, batch: DetectorInputs, x: Tensor, name: str) -> Tensor:
        """``x @ M`` for float64 ``x`` ``[B, D]`` and the fitted matrix ``M = getattr(self, name)`` ``[..., D, K]``,
        computed in the features' precision (float32 for float32 or half features, float64 for float64) and
        returned as float64.

        These ``[B, D] x [D, K]`` products are most of the scoring time of the moment detectors, and float64
        products of float32 features cost twice as much for digits the features do not have (docs/benchmarks.md
        section 8 measures the effect on scores and AUROC). Fitting, the fitted matrices and every other step
        stay float64."""
        dtype = self._product_dtype(batch)
        return (x.to(dtype) @ self._fitted_as(name, dtype)).to(_F64)

    @staticmethod
    def _product_dtype(batch: DetectorInputs) -> torch.dtype:
        return at_least_float32_dtype(batch.features.dtype)

    def _fitted_as(self, name: str, dtype: torch.dtype) -> Tensor:
        """The fitted buffer ``name`` in ``dtype`` (a cast cached until the next fit or load)."""
        tensor = getattr(self, name)
        if tensor.dtype == dtype:
            return tensor
        return self._derived(f"{name}/{dtype}", lambda: tensor.to(dtype))

    # -- products shared within a batch by detectors whose fitted tensors are equal ---------------------------
    def _key(self, *names: str) -> tuple[str, ...]:
        """Content hashes of the named fitted buffers (cached until the next fit or load) and their device."""
        keys = self.__dict__.setdefault("_content_keys", {})
        for name in names:
            if name not in keys:
                keys[name] = content_key(getattr(self, name))
        return (str(self._fitted.device), *(keys[n] for n in names))

    def _centered(self, batch: DetectorInputs) -> Tensor:
        """``z - mu_0``: float64 features centred on the training mean ``center``."""
        return batch.shared(
            ("centered", *self._key("center")), lambda: self._features(batch, self.center) - self.center
        )

    def _whitened(self, batch: DetectorInputs) -> Tensor:
        """``(z - mu_0) W`` for the tied whitener ``W`` (shared by tied Mahalanobis and RMD)."""
        return batch.shared(
            ("whitened", str(batch.features.dtype), *self._key("center", "whitener")),
            lambda: self._product(batch, self._centered(batch), "whitener"),
        )

    def _white_class_distances(self, batch: DetectorInputs) -> Tensor:
        """``[B, C]`` squared tied-Mahalanobis distances to every class mean."""
        return batch.shared(
            (
                "white_class_distances",
                str(batch.features.dtype),
                *self._key("center", "whitener", "white_means"),
            ),
            lambda: squared_distances(self._whitened(batch), self.white_means),
        )


def content_key(tensor: Tensor) -> str:
    """A hash of a tensor's shape, dtype and values: equal fitted tensors of two detectors get the same key."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha1(f"{tuple(data.shape)}/{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
