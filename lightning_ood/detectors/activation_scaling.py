"""Energy of logits recomputed from modified penultimate activations or a modified head: SCALE, DICE, VRA.

Each reads ``[B, D]`` features and the network's head ``(W [C, D], b [C])`` of the same forward pass and returns
``[B]`` energies ``-logsumexp(z')`` of the modified logits ``z'``; higher = more OOD.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.activation_shaping import ReAct, percentile_linear
from lightning_ood.detectors.base import Detector, DetectorInputs
from lightning_ood.detectors.streaming import (
    RunningSums,
    check_fraction,
    energy_of,
    features_of,
    head_weights,
    linear_logits,
)


def scale_activations(features: Tensor, percentile: float) -> Tensor:
    """SCALE's reshaping of ``[B, D]`` activations (Xu et al., ICLR 2024, eq. 3): ``h * exp(s1 / s2)``.

    ``s1`` is the sum of all of a sample's activations and ``s2`` the sum of its ``k = D - round(D * p / 100)``
    largest; unlike ASH-S nothing is pruned. A row whose ``s2`` is 0 is left unscaled.
    """
    d = features.shape[1]
    k = d - round(d * percentile / 100.0)
    if k < 1:
        raise ValueError(f"SCALE percentile {percentile} keeps no activation of D={d}")
    s1 = features.sum(dim=1, keepdim=True)
    s2 = features.topk(k, dim=1, sorted=False).values.sum(dim=1, keepdim=True)
    ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1.0), 0.0)
    return features * ratio.exp()


class SCALE(Detector):
    """SCALE (Xu et al., ICLR 2024, "Scaling for training time and post-hoc out-of-distribution detection
    enhancement", eq. 3): energy of ``W (h * exp(s1 / s2)) + b`` (:func:`scale_activations`). No fitting.

    Args:
        percentile: ``p`` in ``[0, 100)``, the share of activations left out of ``s2``; 85 (the paper's ImageNet
            setting).
        temperature: energy temperature ``T > 0``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features", "head"})
    default_name = "scale"

    def __init__(self, percentile: float = 85.0, temperature: float = 1.0, name: str | None = None) -> None:
        if not 0 <= percentile < 100:
            raise ValueError(f"SCALE percentile must be in [0, 100), got {percentile}")
        if temperature <= 0:
            raise ValueError(f"SCALE temperature must be > 0, got {temperature}")
        super().__init__(name)
        self.percentile = percentile
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, temperature={self.temperature}"

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` energy of the logits of the scaled ``[B, D]`` features; higher = more OOD."""
        scaled = scale_activations(features_of(batch, "SCALE"), self.percentile)
        return energy_of(linear_logits(batch, scaled, "SCALE"), self.temperature)


class DICE(Detector):
    """DICE (Sun & Li, ECCV 2022, "DICE: Leveraging sparsification for out-of-distribution detection", eq. 2-4).

    The contribution of weight ``W_cj`` is ``V_cj = m_j W_cj`` with ``m`` ``[D]`` the mean ID-training
    activation; the ``p`` share of smallest contributions is masked: ``M = V > percentile(V, 100 p)`` (all
    ``C * D`` entries, ``np.percentile``'s linear rule, as the official code). Score: energy of
    ``(W * M) h + b``. Fitting keeps only the ``[D]`` activation sum (float64, summed over ranks); the mask
    ``[C, D]`` is a buffer, applied to the head's current weights.

    Args:
        sparsity: ``p`` in ``[0, 1)``; 0.7 (the paper's ImageNet setting, 0.9 for CIFAR).
        temperature: energy temperature ``T > 0``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features", "head"})
    needs_fit: ClassVar[bool] = True
    default_name = "dice"

    mask: Tensor

    def __init__(self, sparsity: float = 0.7, temperature: float = 1.0, name: str | None = None) -> None:
        check_fraction("DICE", "sparsity", sparsity)
        if temperature <= 0:
            raise ValueError(f"DICE temperature must be > 0, got {temperature}")
        super().__init__(name)
        self.sparsity = sparsity
        self.temperature = temperature
        self.register_buffer("mask", torch.empty(0, dtype=torch.bool))  # [C, D]
        self._sums = RunningSums()

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, temperature={self.temperature}"

    def reset(self) -> None:
        super().reset()
        self._sums.clear()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        feats = features_of(batch, "DICE")
        self._sums.add("sum", feats.sum(0))
        self._sums.add("count", torch.tensor(float(feats.shape[0])))
        if "weight" not in self._sums.sums:  # the head, once (a rank without fit batches receives it)
            self._sums.add("weight", head_weights(batch, feats, "DICE")[0])
            self._sums.add("heads", torch.tensor(1.0))

    def finalize(self) -> None:
        names = ("sum", "count", "weight", "heads")
        sums = self._sums.reduce(names, device=self.mask.device, who=self.name)
        self._sums.clear()
        mean = sums["sum"] / sums["count"]
        contrib = mean[None, :] * (sums["weight"] / sums["heads"])  # every rank has the same head
        threshold = percentile_linear(contrib, 100.0 * self.sparsity)
        self.mask = (contrib > threshold).to(self.mask.device)
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` energy of ``(W * M) h + b``; higher = more OOD."""
        feats = features_of(batch, "DICE")
        weight, bias = head_weights(batch, feats, "DICE")
        if weight.shape != self.mask.shape:
            raise ValueError(
                f"DICE was fitted for a [C, D] = {tuple(self.mask.shape)} head, got {tuple(weight.shape)}"
            )
        masked = torch.where(self.mask.to(weight.device), weight, 0.0)
        logits = torch.nn.functional.linear(feats.to(weight.dtype), masked, bias)
        return energy_of(logits, self.temperature)


def vra_activations(features: Tensor, low: float, high: float, gamma: float) -> Tensor:
    """VRA+ (Xu et al., NeurIPS 2023, eq. 11): ``0`` below ``low``, ``h + gamma`` in ``[low, high]``,
    ``high`` above ``high``, elementwise on ``[B, D]`` activations."""
    shifted = torch.where(features > high, torch.full_like(features, high), features + gamma)
    return torch.where(features < low, torch.zeros_like(features), shifted)


class VRA(Detector):
    """VRA (Xu et al., NeurIPS 2023, "VRA: Variational rectified activation for out-of-distribution detection",
    VRA+ of eq. 11): energy of ``W g(h) + b`` with :func:`vra_activations` ``g``.

    ``low`` and ``high`` are the ``lower`` and ``upper`` percentiles of all ``N * D`` ID-training activations,
    as ReAct's threshold (each fitted by a :class:`ReAct` instance, so memory is twice ReAct's unless
    ``max_samples`` is set). The paper tunes the three values per backbone on validation data; these defaults
    are ours, and all three are in the search grid.

    Args:
        lower: percentile of ``low`` in ``[0, 100]``; 60.
        upper: percentile of ``high``, ``>= lower``; 95.
        gamma: the shift of the kept band; 0.5.
        max_samples: ReAct's row cap for the percentiles (``None``: exact).
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features", "head"})
    needs_fit: ClassVar[bool] = True
    default_name = "vra"

    def __init__(
        self,
        lower: float = 60.0,
        upper: float = 95.0,
        gamma: float = 0.5,
        max_samples: int | None = None,
        name: str | None = None,
    ) -> None:
        if not 0 <= lower <= upper <= 100:
            raise ValueError(f"VRA needs 0 <= lower <= upper <= 100, got lower={lower}, upper={upper}")
        super().__init__(name)
        self.lower, self.upper, self.gamma, self.max_samples = lower, upper, gamma, max_samples
        self.low = ReAct(percentile=lower, max_samples=max_samples, name="low")
        self.high = ReAct(percentile=upper, max_samples=max_samples, name="high")

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}, gamma={self.gamma}, max_samples={self.max_samples}"

    def reset(self) -> None:
        super().reset()
        self.low.reset()
        self.high.reset()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        self.low.update(batch, targets)
        self.high.update(batch, targets)

    def finalize(self) -> None:
        self.low.finalize()
        self.high.finalize()
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` energy of the logits of the rectified ``[B, D]`` features; higher = more OOD."""
        low, high = float(self.low.threshold_), float(self.high.threshold_)
        shaped = vra_activations(features_of(batch, "VRA"), low, high, self.gamma)
        return energy_of(linear_logits(batch, shaped, "VRA"))
