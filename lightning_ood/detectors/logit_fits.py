"""Logit detectors with a small fit on the ID training set: KL matching, temperature-scaled MSP, weighted energy.

Each reads ``[B, C]`` logits and returns ``[B]`` float64 scores, higher = more OOD. Fits are float64 running
sums (:class:`~lightning_ood.detectors.streaming.RunningSums`), added over ranks: a DDP fit equals a
one-process fit and nothing per sample is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs
from lightning_ood.detectors.streaming import RunningSums, logits_of

_F64 = torch.float64


class KLMatching(Detector):
    """KL matching (Hendrycks et al., ICML 2022, "Scaling out-of-distribution detection for real-world
    settings", Sec. 4): ``min_k KL(p || d_k)`` with ``p = softmax(z)``.

    ``d_k`` ``[C]`` is the mean softmax of the fit samples the network *predicts* as class ``k`` (labels are
    not used); classes never predicted get no template. The paper fits the templates on validation data;
    here they come from the detector fit set (ID train). ``0 log 0 = 0``; a template entry that underflowed
    to 0 contributes ``p_c * log(tiny)``. Fitting keeps ``[C, C]`` sums and ``[C]`` counts.
    """

    needs_fit: ClassVar[bool] = True
    default_name = "kl_matching"

    templates: Tensor

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.register_buffer("templates", torch.empty(0, dtype=_F64))  # [K, C], K <= C predicted classes
        self._sums = RunningSums()

    def reset(self) -> None:
        super().reset()
        self._sums.clear()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        logits = logits_of(batch, "KLMatching").to(_F64)
        probs = logits.softmax(dim=1)
        onehot = torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).to(_F64)
        self._sums.add("sums", onehot.mT @ probs)
        self._sums.add("counts", onehot.sum(0))

    def finalize(self) -> None:
        sums = self._sums.reduce(("sums", "counts"), device=self.templates.device, who=self.name)
        self._sums.clear()
        seen = sums["counts"] > 0
        self.templates = sums["sums"][seen] / sums["counts"][seen, None]
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` KL divergence to the nearest class template; higher = more OOD."""
        log_p = logits_of(batch, "KLMatching").to(_F64).log_softmax(dim=1)
        p = log_p.exp()
        templates = self.templates.to(p.device)
        log_d = templates.log().clamp_min(math.log(torch.finfo(_F64).tiny))
        neg_entropy = (p * log_p).sum(dim=1, keepdim=True)
        return (neg_entropy - p @ log_d.mT).amin(dim=1)


def temperature_grid(t_min: float, t_max: float, size: int) -> Tensor:
    """``[size]`` float64 temperatures, log-spaced from ``t_min`` to ``t_max``."""
    return torch.logspace(math.log10(t_min), math.log10(t_max), size, dtype=_F64)


class TemperatureScaledMSP(Detector):
    """MSP of temperature-scaled logits (Guo et al., ICML 2017, "On calibration of modern neural networks",
    Sec. 4.2): ``-max_c softmax(z / T)_c``, with ``T`` fitted by minimising the negative log-likelihood of the
    labelled fit set.

    The fit is one streaming pass: the summed NLL at every temperature of a log-spaced grid (``grid_size``
    values in ``[t_min, t_max]``, float64, added over ranks) is kept, and ``T`` is the grid point of least
    NLL, so ``T`` is within one grid step (``(t_max / t_min) ** (1 / (grid_size - 1))``, 3 % by default) of
    the exact minimiser. The paper fits ``T`` on a held-out validation set; here it is the detector fit set
    (ID train, where a network is usually over-confident: expect ``T`` below its validation value). Set
    ``temperature`` to use a fixed ``T`` and fit nothing. Cost of the fit: ``grid_size`` log-softmaxes per
    sample.

    Args:
        temperature: a fixed ``T > 0``; ``None`` (default) fits it.
        t_min / t_max / grid_size: the fit's grid; 0.05, 20, 200.
    """

    needs_fit: ClassVar[bool] = True
    default_name = "temperature_scaled_msp"

    temperature_: Tensor

    def __init__(
        self,
        temperature: float | None = None,
        t_min: float = 0.05,
        t_max: float = 20.0,
        grid_size: int = 200,
        name: str | None = None,
    ) -> None:
        if temperature is not None and temperature <= 0:
            raise ValueError(f"TemperatureScaledMSP temperature must be > 0, got {temperature}")
        if not 0 < t_min < t_max or grid_size < 2:
            raise ValueError(
                f"TemperatureScaledMSP needs 0 < t_min < t_max and grid_size >= 2, got {t_min}, {t_max}, {grid_size}"
            )
        self.needs_fit = temperature is None  # type: ignore[misc]
        super().__init__(name)
        self.temperature, self.t_min, self.t_max, self.grid_size = temperature, t_min, t_max, grid_size
        init = math.nan if temperature is None else float(temperature)
        self.register_buffer("temperature_", torch.tensor(init, dtype=_F64))
        self._sums = RunningSums()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, t_min={self.t_min}, t_max={self.t_max}, grid_size={self.grid_size}"

    def reset(self) -> None:
        super().reset()
        self._sums.clear()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        if not self.needs_fit:
            return
        logits = logits_of(batch, "TemperatureScaledMSP").to(_F64)
        targets = targets.to(logits.device)
        if bool((targets < 0).any()):
            raise ValueError("TemperatureScaledMSP fits T on labelled ID samples; got targets < 0")
        grid = temperature_grid(self.t_min, self.t_max, self.grid_size).to(logits.device)
        true = logits.gather(1, targets[:, None])  # [B, 1]
        nll = torch.stack([(torch.logsumexp(logits / t, dim=1) - true[:, 0] / t).sum() for t in grid])
        self._sums.add("nll", nll)

    def finalize(self) -> None:
        if self.needs_fit:
            nll = self._sums.reduce(("nll",), device=self.temperature_.device, who=self.name)["nll"]
            self._sums.clear()
            grid = temperature_grid(self.t_min, self.t_max, self.grid_size).to(nll.device)
            self.temperature_.fill_(float(grid[nll.argmin()]))
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` ``-max softmax(z / T)``, in ``[-1, -1/C]``; higher = more OOD."""
        logits = logits_of(batch, "TemperatureScaledMSP").to(_F64)
        return -(logits / self.temperature_.to(logits.device)).softmax(dim=1).amax(dim=1)


class WeightedEnergy(Detector):
    """Weighted energy (Du et al., ICLR 2022, "VOS: Learning what you don't know by virtual outlier synthesis",
    eq. 7): ``-log sum_c w_c exp(z_c)`` with ``w_c = max(w_c, 0)``, computed as ``-logsumexp(z + log w)``.

    VOS learns ``w`` while training with virtual outliers; pass those ``weights``. Without them (``None``) the
    weights are fitted as the ID-training class priors ``w_c = n_c / N`` (our post-hoc choice, not the
    paper's: for balanced classes it ranks exactly like :class:`~lightning_ood.detectors.Energy`).

    Args:
        weights: ``[C]`` non-negative class weights (at least one > 0), or ``None`` to fit class priors.
    """

    needs_fit: ClassVar[bool] = True
    default_name = "weighted_energy"

    weights_: Tensor

    def __init__(self, weights: Sequence[float] | None = None, name: str | None = None) -> None:
        if weights is not None and (len(weights) == 0 or max(weights) <= 0):
            raise ValueError(f"WeightedEnergy weights need at least one positive entry, got {list(weights)}")
        self.needs_fit = weights is None  # type: ignore[misc]
        super().__init__(name)
        self.weights = None if weights is None else [float(w) for w in weights]
        init = torch.empty(0) if weights is None else torch.tensor(self.weights)
        self.register_buffer("weights_", init.to(_F64))
        self._sums = RunningSums()

    def extra_repr(self) -> str:
        return f"weights={self.weights}"

    def reset(self) -> None:
        super().reset()
        self._sums.clear()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        if not self.needs_fit:
            return
        logits = logits_of(batch, "WeightedEnergy")
        targets = targets.to(logits.device)
        if bool((targets < 0).any()):
            raise ValueError("WeightedEnergy fits class priors from labelled ID samples; got targets < 0")
        self._sums.add("counts", torch.bincount(targets, minlength=logits.shape[1]))

    def finalize(self) -> None:
        if self.needs_fit:
            counts = self._sums.reduce(("counts",), device=self.weights_.device, who=self.name)["counts"]
            self._sums.clear()
            self.weights_ = counts / counts.sum()
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` weighted energy; higher = more OOD."""
        logits = logits_of(batch, "WeightedEnergy").to(_F64)
        weights = self.weights_.to(logits.device)
        if weights.shape[0] != logits.shape[1]:
            raise ValueError(f"WeightedEnergy has {weights.shape[0]} weights for {logits.shape[1]} classes")
        return -torch.logsumexp(logits + weights.clamp_min(0.0).log(), dim=1)
