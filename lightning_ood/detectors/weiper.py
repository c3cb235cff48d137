"""WeiPer: scores from random perturbations of the head's class projections (Granz, Heurich & Landgraf, NeurIPS
2024, "WeiPer: OOD detection using weight perturbations of class projections", Sec. 3).

Each of the head's ``C`` class projections ``w_c`` (the rows of ``W`` ``[C, D]``) is perturbed ``r`` times,

    w~_kc = w_c + delta * ||w_c|| * u_kc,    u_kc = n / ||n||,  n ~ N(0, I_D),    k = 1 .. r,

a cone of ``r * C`` projections around the class directions (each keeps its class's bias ``b_c``); a ``[B, D]``
feature ``h`` projected onto all of them gives the ``[B, r, C]`` perturbed logits ``z~_kc = w~_kc . h + b_c``.
The directions ``u`` are drawn once from ``seed`` with a CPU generator (the same on every machine, rank and
run) and kept in the ``directions`` buffer ``[r, C, D]``, float32: ``4 r C D`` bytes, 2 MB for CIFAR-10 on
ResNet-18 (r = 100, C = 10, D = 512), 0.8 GB for ImageNet-1K on ResNet-50 (C = 1000, D = 2048). Scoring a batch
costs ``r`` times the head's product (``B x D x r C``) and a transient ``[r C, D]`` perturbed head.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs, all_reduce_max
from lightning_ood.detectors.streaming import RunningSums, features_of, head_weights
from lightning_ood.detectors.weiper_ops import (
    bin_counts,
    perturbation_directions,
    perturbed_heads,
    smooth,
    symmetric_kl,
    weiper_msp,
)

_F64 = torch.float64
_CHUNK_VALUES = 1 << 22  # perturbed logits materialised at a time (rows x r C): 32 MB of float64


class _PerturbedHead(Detector):
    """The perturbed head of a ``[B, D]`` feature: ``directions`` drawn from ``seed`` for the head's shape."""

    requires: ClassVar[frozenset[str]] = frozenset({"features", "head"})

    directions: Tensor

    def __init__(self, repeats: int, delta: float, seed: int, name: str | None) -> None:
        who = type(self).__name__
        if repeats < 1:
            raise ValueError(f"{who} repeats must be >= 1, got {repeats}")
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError(
                f"{who} delta (the perturbation size relative to ||w_c||) must be >= 0, got {delta}"
            )
        super().__init__(name)
        self.repeats, self.delta, self.seed = repeats, delta, seed
        self.register_buffer("directions", torch.empty(0))  # [r, C, D], drawn for the first head seen

    def _perturbed(
        self, weight: Tensor, bias: Tensor | None, *, redraw: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``[r C, D]`` perturbed weights and ``[r C]`` biases of the head ``(weight [C, D], bias [C])``, in
        ``weight``'s dtype. ``redraw``: draw the directions for a head of another shape (else an error)."""
        shape = (self.repeats, *weight.shape)
        if tuple(self.directions.shape) != shape:
            if self.directions.numel() and not redraw:
                raise ValueError(
                    f"detector {self.name!r} was fitted with a head of {tuple(self.directions.shape[1:])} "
                    f"(classes, features), got {tuple(weight.shape)}; fit it again for this network"
                )
            self.directions = perturbation_directions(*shape, self.seed).to(weight.device)
        heads = perturbed_heads(weight, self.directions.to(weight.device), self.delta)
        return heads, None if bias is None else bias.repeat(self.repeats)


class WeiPer(_PerturbedHead):
    """MSP over the perturbed heads (the paper's MSP_W, Sec. 3), negated:
    ``-1/r sum_k max_c softmax(z~_k)_c`` with ``z~_k = W~_k h + b`` (module docstring). Higher = more OOD. No
    fit. The product runs in the wider of the features' and the head's dtypes (at least float32), the softmax
    in float64. One class: constant ``-1``.

    Args:
        repeats: ``r >= 1``, perturbations of each class projection; 100 (the paper's).
        delta: ``delta >= 0``, perturbation size relative to ``||w_c||``; 1.8 (the authors' CIFAR-10 setting
            for WeiPer+KLD; 2.4 for CIFAR-100 and ImageNet with ResNet-50, 2.0 for ViT-B/16). 0: plain MSP.
        seed: seed of the directions.
    """

    default_name = "weiper"

    def __init__(
        self, repeats: int = 100, delta: float = 1.8, seed: int = 0, name: str | None = None
    ) -> None:
        super().__init__(repeats, delta, seed, name)
        # No fit: the directions are drawn for the first head scored and are not state. Not a buffer, because a
        # rank that scores nothing would keep an empty one, and Lightning's stage-start broadcast of buffers
        # from rank 0 needs the same shapes on every rank.
        del self._buffers["directions"]
        self.directions = torch.empty(0)

    def extra_repr(self) -> str:
        return f"repeats={self.repeats}, delta={self.delta}, seed={self.seed}"

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negated mean MSP of the perturbed heads; higher = more OOD."""
        feats = features_of(batch, "WeiPer")
        weight, bias = head_weights(batch, feats, "WeiPer")
        heads, biases = self._perturbed(weight, bias, redraw=True)
        logits = F.linear(feats.to(heads.dtype), heads, biases)
        return -weiper_msp(logits.to(_F64).view(feats.shape[0], self.repeats, -1))


class WeiPerKLD(_PerturbedHead):
    """WeiPer+KLD (Sec. 3), the paper's confidence negated:

    ``KL_sym(p_h, S_s1(q_h)) + lambda_1 KL_sym(p_z, S_s2(q_z)) - lambda_2 MSP_W``

    ``q_h`` ``[n_bins]`` is the share of a sample's ``D`` feature values in each of ``n_bins`` equal bins of the
    fitted feature range, ``q_z`` the same of its ``r C`` perturbed logits over the fitted logit range; ``p_h``,
    ``p_z`` their means over the ID training set. ``S_s`` is a moving average over ``s`` bins (:func:`smooth`;
    only the test sample's histogram is smoothed, as in the authors' code), ``KL_sym`` the symmetric KL
    divergence after adding ``epsilon`` (features) or ``epsilon_perturbed`` (logits) to every bin and
    renormalising (:func:`symmetric_kl`), ``MSP_W`` the mean MSP of the perturbed heads (:class:`WeiPer`).
    Higher = more OOD. Perturbed logits are computed in float64 (so a value's bin does not depend on the batch
    it came in).

    **Ranges and fit.** The bins span the minimum to the maximum over the ID training set of all ``N D`` feature
    values and of all ``N r C`` perturbed logits (the authors' ``exact_minmax``); a test value outside falls in
    no bin (it still counts in the sample's total). The range is only known after the pass, so the fit keeps
    this rank's features (as ReAct does: ``N D`` float32 over the ``W`` ranks; 10.5 GB / W for ImageNet-1K on
    ResNet-50), the minima / maxima are max-reduced over ranks, and ``finalize`` recomputes the perturbed logits
    chunk by chunk to count the bins (``2 N D r C`` float64 multiply-adds in all: 5e14 for ImageNet-1K at
    r = 100, a GPU job). Counts are float64 sums of integers reduced over ranks: a DDP fit equals the
    one-process fit, and nothing ``N x D`` is gathered. Set both ``feature_range`` and ``projection_range`` to
    fix the bins up front (e.g. a previous fit's ``feature_range_`` / ``projection_range_``): the fit is then
    streaming, ``2 n_bins`` counts per rank and one product per sample. Candidates of the detector search that
    differ only in ``lambda_*``, ``smoothing*`` or ``epsilon*`` share one fit.

    **Departures from the authors' code**: the last bin is closed at the maximum (they widen it by 1e-8), the
    training means weigh every sample equally (they average per-batch means), products are float64.

    Defaults: the authors' CIFAR-10 / ResNet-18 setting (the hyperparameter table of their OpenOOD integration;
    CIFAR-100: ``delta`` 2.4, ``lambda_1`` 0.1, ``lambda_2`` 1, ``smoothing_perturbed`` 40; ImageNet-1K with
    ResNet-50: ``delta`` 2.4, ``lambda_2`` 0.25, ``smoothing`` 40), the ``epsilon`` values of their code.

    Args:
        repeats: ``r``; 100.
        delta: perturbation size relative to ``||w_c||``; 1.8.
        n_bins: bins of both histograms; 100.
        lambda_1 / lambda_2: weights ``>= 0`` of the perturbed-logit KL and of ``MSP_W``; 2.5, 0.1.
        smoothing / smoothing_perturbed: ``s1``, ``s2`` (bins, ``>= 1``); 4, 15.
        epsilon / epsilon_perturbed: ``> 0``, added to every bin; 0.01, 0.025.
        seed: seed of the directions.
        feature_range / projection_range: fixed ``(low, high)`` bins (both, for a streaming fit); ``None``.
    """

    needs_fit: ClassVar[bool] = True
    default_name = "weiper_kld"

    feature_range_: Tensor
    projection_range_: Tensor
    feature_density: Tensor
    projection_density: Tensor

    def __init__(
        self,
        repeats: int = 100,
        delta: float = 1.8,
        n_bins: int = 100,
        lambda_1: float = 2.5,
        lambda_2: float = 0.1,
        smoothing: int = 4,
        smoothing_perturbed: int = 15,
        epsilon: float = 0.01,
        epsilon_perturbed: float = 0.025,
        seed: int = 0,
        feature_range: tuple[float, float] | None = None,
        projection_range: tuple[float, float] | None = None,
        name: str | None = None,
    ) -> None:
        if n_bins < 1 or smoothing < 1 or smoothing_perturbed < 1:
            raise ValueError(
                f"WeiPerKLD needs n_bins, smoothing and smoothing_perturbed >= 1, got {n_bins}, {smoothing}, "
                f"{smoothing_perturbed}"
            )
        if not (lambda_1 >= 0 and lambda_2 >= 0 and epsilon > 0 and epsilon_perturbed > 0):
            raise ValueError(
                f"WeiPerKLD needs lambda_1, lambda_2 >= 0 and epsilon, epsilon_perturbed > 0, got {lambda_1}, "
                f"{lambda_2}, {epsilon}, {epsilon_perturbed}"
            )
        for key, span in (("feature_range", feature_range), ("projection_range", projection_range)):
            if span is not None and not (
                len(span) == 2 and math.isfinite(span[0]) and span[0] < span[1] < math.inf
            ):
                raise ValueError(f"WeiPerKLD {key} must be a finite (low, high) with low < high, got {span}")
        super().__init__(repeats, delta, seed, name)
        self.n_bins, self.lambda_1, self.lambda_2 = n_bins, lambda_1, lambda_2
        self.smoothing, self.smoothing_perturbed = smoothing, smoothing_perturbed
        self.epsilon, self.epsilon_perturbed = epsilon, epsilon_perturbed
        self.feature_range = None if feature_range is None else tuple(map(float, feature_range))
        self.projection_range = None if projection_range is None else tuple(map(float, projection_range))
        for buf in ("feature_range_", "projection_range_"):
            self.register_buffer(buf, torch.full((2,), math.nan, dtype=_F64))
        for buf in ("feature_density", "projection_density"):
            self.register_buffer(buf, torch.empty(0, dtype=_F64))  # [n_bins]
        self._sums = RunningSums()
        self._rows: list[Tensor] = []
        self._extent = torch.full((4,), -math.inf, dtype=_F64)  # running [-min h, max h, -min z, max z]
        self._head: tuple[Tensor, Tensor | None] | None = None
        self._followers: list[WeiPerKLD] = []

    def extra_repr(self) -> str:
        return (
            f"repeats={self.repeats}, delta={self.delta}, n_bins={self.n_bins}, lambda_1={self.lambda_1}, "
            f"lambda_2={self.lambda_2}, smoothing={self.smoothing}, smoothing_perturbed={self.smoothing_perturbed}, "
            f"epsilon={self.epsilon}, epsilon_perturbed={self.epsilon_perturbed}, seed={self.seed}, "
            f"feature_range={self.feature_range}, projection_range={self.projection_range}"
        )

    @property
    def _streaming(self) -> bool:
        return self.feature_range is not None and self.projection_range is not None

    def fit_state_key(self) -> str | None:
        """Candidates with the same perturbations and bins have the same fit, whatever their scoring weights."""
        if type(self) is not WeiPerKLD:
            return None
        return (
            f"WeiPerKLD(repeats={self.repeats}, delta={self.delta}, n_bins={self.n_bins}, seed={self.seed}, "
            f"feature_range={self.feature_range}, projection_range={self.projection_range})"
        )

    def share_fit_with(self, followers: list[Detector]) -> None:
        self._followers = [det for det in followers if isinstance(det, WeiPerKLD)]

    def reset(self) -> None:
        super().reset()
        self._sums.clear()
        self._rows, self._head = [], None
        self._extent = torch.full((4,), -math.inf, dtype=_F64)

    def _logits(
        self, weight: Tensor, bias: Tensor | None, feats: Tensor, *, redraw: bool = True
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(h [b, D], z~ [b, r C])`` float64, chunk by chunk of the ``[B, D]`` features."""
        heads, biases = self._perturbed(
            weight.to(_F64), None if bias is None else bias.to(_F64), redraw=redraw
        )
        for h in feats.to(_F64).split(max(1, _CHUNK_VALUES // heads.shape[0])):
            yield h, F.linear(h, heads, biases)

    def _count(
        self, h: Tensor, z: Tensor, f_range: tuple[float, float], p_range: tuple[float, float]
    ) -> None:
        self._sums.add("features", bin_counts(h, *f_range, self.n_bins).sum(0))
        self._sums.add("projections", bin_counts(z, *p_range, self.n_bins).sum(0))
        self._sums.add("values", torch.tensor([float(h.numel()), float(z.numel())]))

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        """Count this batch's bins (fixed ranges) or keep its ``[B, D]`` features and their extremes."""
        feats = features_of(batch, "WeiPerKLD")
        weight, bias = head_weights(batch, feats.new_empty(0, dtype=_F64), "WeiPerKLD")
        self._head = (weight, bias)
        if feats.shape[0] == 0:
            return
        for h, z in self._logits(weight, bias, feats):
            if self._streaming:
                self._count(h, z, self.feature_range, self.projection_range)  # type: ignore[arg-type]
            else:
                ext = torch.stack([-h.min(), h.max(), -z.min(), z.max()]).cpu()
                self._extent = torch.maximum(self._extent, ext)
        if not self._streaming:
            self._rows.append(feats)

    def finalize(self) -> None:
        """Agree on the ranges (max-reduce), count the kept features' bins, sum the counts over ranks. A
        collective every rank enters, also one without fit batches."""
        device = self.feature_density.device
        self._agree_directions(device)
        f_range, p_range = self.feature_range, self.projection_range
        if not self._streaming:
            where = self._rows[0].device if self._rows else device
            ext = all_reduce_max(self._extent.to(where)).tolist()
            if ext[1] == -math.inf:
                raise RuntimeError(
                    f"detector {self.name!r}: no ID training features on any rank (finalize() without a "
                    "non-empty update()); fit it on a non-empty ID training set"
                )
            f_range, p_range = (-ext[0], ext[1]), (-ext[2], ext[3])
            rows, self._rows = self._rows, []
            for feats in rows:
                assert self._head is not None
                for h, z in self._logits(*self._head, feats):
                    self._count(h, z, f_range, p_range)  # type: ignore[arg-type]
        sums = self._sums.reduce(("features", "projections", "values"), device=device, who=self.name)
        self._sums.clear()
        followers, self._followers = self._followers, []
        for det in (self, *followers):
            det.feature_range_ = torch.tensor(f_range, dtype=_F64, device=device)
            det.projection_range_ = torch.tensor(p_range, dtype=_F64, device=device)
            det.feature_density = sums["features"] / sums["values"][0]
            det.projection_density = sums["projections"] / sums["values"][1]
            if det is not self and self.directions.numel():
                det.directions = self.directions  # the same seed and shape: one copy for the group
            det._fitted.fill_(True)
        super().finalize()

    def _agree_directions(self, device: torch.device) -> None:
        """A rank that saw no fit batch has not drawn the directions yet: agree on the head's ``(C, D)`` (one
        max-reduce) and draw the same ones, so the buffer is the same on every rank (Lightning broadcasts
        buffers from rank 0 when a stage starts, which needs equal shapes)."""
        mine = list(self.directions.shape[1:]) if self.directions.numel() else [0, 0]
        classes, dim = all_reduce_max(torch.tensor(mine, dtype=torch.long, device=device)).tolist()
        if not self.directions.numel() and classes and dim:
            self.directions = perturbation_directions(self.repeats, classes, dim, self.seed).to(device)

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` feature KL + ``lambda_1`` perturbed-logit KL - ``lambda_2`` MSP_W; higher = more OOD."""
        feats = features_of(batch, "WeiPerKLD")
        weight, bias = head_weights(batch, feats.new_empty(0, dtype=_F64), "WeiPerKLD")
        f_range, p_range = self.feature_range_.tolist(), self.projection_range_.tolist()
        p_h, p_z = self.feature_density.to(weight.device), self.projection_density.to(weight.device)
        out = [torch.empty(0, dtype=_F64, device=weight.device)]
        for h, z in self._logits(weight, bias, feats, redraw=False):  # fitted for another head: an error
            q_h = bin_counts(h, *f_range, self.n_bins) / h.shape[1]
            q_z = bin_counts(z, *p_range, self.n_bins) / z.shape[1]
            kl_h = symmetric_kl(p_h, smooth(q_h, self.smoothing), self.epsilon)
            kl_z = symmetric_kl(p_z, smooth(q_z, self.smoothing_perturbed), self.epsilon_perturbed)
            msp = weiper_msp(z.view(z.shape[0], self.repeats, -1))
            out.append(kl_h + self.lambda_1 * kl_z - self.lambda_2 * msp)
        return torch.cat(out)
