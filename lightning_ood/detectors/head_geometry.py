"""Detectors from the geometry of the penultimate features and the linear head: NCI, fDBD, SHE, GradNorm.

All read ``[B, D]`` features ``h``, the head ``(W [C, D], b [C])`` and ``[B, C]`` logits ``z = W h + b`` of one
forward pass (the predicted class is ``y_hat = argmax z``) and return ``[B]`` scores, higher = more OOD.
Fitted state (NCI, fDBD: the ``[D]`` training mean; SHE: ``[C, D]`` class patterns) is a float64 running sum,
added over ranks, so a DDP fit equals a one-process fit.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs
from lightning_ood.detectors.streaming import RunningSums, features_of, head_weights, linear_logits, logits_of

_F64 = torch.float64


class _MeanFitted(Detector):
    """Fits ``train_mean`` ``[D]``, the mean of the ID-training features (float64)."""

    requires: ClassVar[frozenset[str]] = frozenset({"features", "head"})
    needs_fit: ClassVar[bool] = True

    train_mean: Tensor

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.register_buffer("train_mean", torch.empty(0, dtype=_F64))
        self._sums = RunningSums()

    def reset(self) -> None:
        super().reset()
        self._sums.clear()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        feats = features_of(batch, type(self).__name__)
        self._sums.add("sum", feats.sum(0))
        self._sums.add("count", torch.tensor(float(feats.shape[0])))

    def finalize(self) -> None:
        sums = self._sums.reduce(("sum", "count"), device=self.train_mean.device, who=self.name)
        self._sums.clear()
        self.train_mean = sums["sum"] / sums["count"]
        super().finalize()

    def _logits(self, batch: DetectorInputs, feats: Tensor) -> Tensor:
        return (
            logits_of(batch, self.name)
            if batch.logits is not None
            else linear_logits(batch, feats, self.name)
        )


class NCI(_MeanFitted):
    """Neural-collapse inspired detector (Liu & Qin, CVPR 2025, "Detecting out-of-distribution through the lens
    of neural collapse", eq. 5-6): ``-( (h - mu_G) . w_y_hat / ||h - mu_G|| + alpha ||h||_1 )``.

    ``mu_G`` is the mean ID-training feature, ``w_y_hat`` the head's weight row of the predicted class (not
    normalised, as in the paper's pScore). ``alpha`` weighs the L1-norm term (the paper tunes it per backbone;
    0 keeps pScore alone). A feature equal to ``mu_G`` has pScore 0.

    Args:
        alpha: weight of ``||h||_1``, ``>= 0``; 0.
    """

    default_name = "nci"

    def __init__(self, alpha: float = 0.0, name: str | None = None) -> None:
        if alpha < 0:
            raise ValueError(f"NCI alpha must be >= 0, got {alpha}")
        super().__init__(name)
        self.alpha = alpha

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negated NCI score; higher = more OOD."""
        feats = features_of(batch, "NCI").to(_F64)
        weight, _ = head_weights(batch, feats, "NCI")
        pred = self._logits(batch, feats).argmax(dim=1)
        centred = feats - self.train_mean.to(feats.device)
        norm = centred.norm(dim=1)
        dot = (centred * weight[pred]).sum(dim=1)
        p_score = torch.where(norm > 0, dot / torch.where(norm > 0, norm, 1.0), 0.0)
        return -(p_score + self.alpha * feats.abs().sum(dim=1))


class FDBD(_MeanFitted):
    """Fast decision-boundary distance (Liu & Qin, ICML 2024, "Fast decision boundary based out-of-distribution
    detector", eq. 4-5), negated:

    ``-1/(C-1) sum_{c != y_hat} |z_y_hat - z_c| / ||w_y_hat - w_c||  /  ||h - mu||``

    (the distance of ``h`` to each decision boundary of the linear head, averaged over the other classes and
    divided by the distance to the ID-training mean ``mu``). Hyperparameter-free. A pair of identical weight
    rows has no boundary and adds 0; a feature equal to ``mu`` scores ``-inf`` (most ID). Needs ``C >= 2``.
    """

    default_name = "fdbd"

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negated normalised boundary distance; higher = more OOD."""
        feats = features_of(batch, "fDBD").to(_F64)
        weight, _ = head_weights(batch, feats, "fDBD")
        c = weight.shape[0]
        if c < 2:
            raise ValueError("fDBD needs at least 2 classes (decision boundaries), got a 1-class head")
        logits = self._logits(batch, feats).to(_F64)
        top, pred = logits.max(dim=1)
        pair = torch.cdist(weight, weight)  # [C, C] ||w_p - w_c||
        norms = pair[pred]  # [B, C]
        terms = torch.where(
            norms > 0, (top[:, None] - logits).abs() / torch.where(norms > 0, norms, 1.0), 0.0
        )
        dist = (feats - self.train_mean.to(feats.device)).norm(dim=1)
        return -(terms.sum(dim=1) / (c - 1)) / dist


class SHE(Detector):
    """Simplified Hopfield energy (Zhang et al., ICLR 2023, "Out-of-distribution detection based on
    in-distribution data patterns memorization with modern Hopfield energy", eq. 7), negated: ``-h . S_y_hat``.

    ``S_c`` ``[D]`` is the mean feature of the ID-training samples of class ``c`` that the network classifies
    correctly (the stored pattern); ``y_hat`` the predicted class. Fitting keeps ``[C, D]`` sums and ``[C]``
    counts (float64); a class without a correctly classified training sample (an untrained network) takes the
    mean of all its training samples, and a class without any is an error.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"logits", "features"})
    needs_fit: ClassVar[bool] = True
    default_name = "she"

    patterns: Tensor

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.register_buffer("patterns", torch.empty(0, dtype=_F64))  # [C, D]
        self._sums = RunningSums()

    def reset(self) -> None:
        super().reset()
        self._sums.clear()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        feats, logits = features_of(batch, "SHE").to(_F64), logits_of(batch, "SHE")
        targets = targets.to(logits.device)
        if bool((targets < 0).any()):
            raise ValueError("SHE is fitted on labelled ID training samples; got targets < 0")
        correct = (logits.argmax(dim=1) == targets).to(_F64)
        onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).to(_F64)
        self._sums.add("sums", (onehot * correct[:, None]).mT @ feats)
        self._sums.add("counts", (onehot * correct[:, None]).sum(0))
        self._sums.add("all_sums", onehot.mT @ feats)
        self._sums.add("all_counts", onehot.sum(0))

    def finalize(self) -> None:
        names = ("sums", "counts", "all_sums", "all_counts")
        sums = self._sums.reduce(names, device=self.patterns.device, who=self.name)
        self._sums.clear()
        empty = ((sums["counts"] == 0) & (sums["all_counts"] == 0)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"SHE: class(es) {empty[:10]} have no ID training sample, so their stored pattern is undefined"
            )
        fallback = sums["counts"] == 0  # no correct sample (an untrained network): all of the class's samples
        total = torch.where(fallback[:, None], sums["all_sums"], sums["sums"])
        self.patterns = total / torch.where(fallback, sums["all_counts"], sums["counts"])[:, None]
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negated Hopfield energy; higher = more OOD."""
        feats = features_of(batch, "SHE").to(_F64)
        pred = logits_of(batch, "SHE").argmax(dim=1)
        return -(feats * self.patterns.to(feats.device)[pred]).sum(dim=1)


class GradNorm(Detector):
    """GradNorm (Huang et al., NeurIPS 2021, "On the importance of gradients for detecting distributional
    shifts in the wild", eq. 2-4), negated, in closed form from the same forward pass.

    The paper's score is the L1 norm of the gradient of ``KL(u || softmax(z / T))`` (``u`` uniform over the
    ``C`` classes) with respect to the last layer's weights ``W``. With ``z = W h + b`` that gradient is the
    outer product ``(softmax(z / T) - u) h^T / T``, so its L1 norm is exactly
    ``||softmax(z / T) - u||_1 * ||h||_1 / T`` (the paper's eq. 4 decomposition): no backward pass is needed,
    and the score equals the autograd one (tested). Higher = more OOD. A single class gives 0 everywhere.

    Args:
        temperature: ``T > 0``; the paper uses 1.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"logits", "features", "head"})
    default_name = "grad_norm"

    def __init__(self, temperature: float = 1.0, name: str | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"GradNorm temperature must be > 0, got {temperature}")
        super().__init__(name)
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negated last-layer gradient norm; higher = more OOD."""
        logits = logits_of(batch, "GradNorm")
        probs = (logits / self.temperature).softmax(dim=1)
        spread = (probs - 1.0 / logits.shape[1]).abs().sum(dim=1)
        return -spread * features_of(batch, "GradNorm").abs().sum(dim=1).to(spread.dtype) / self.temperature
