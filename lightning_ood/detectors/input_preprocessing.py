"""Mahalanobis with input preprocessing: a gradient step on the input towards the nearest class Gaussian."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs, ScoringModel
from lightning_ood.detectors.gaussian_stats import squared_distances
from lightning_ood.detectors.mahalanobis import Mahalanobis

_F64 = torch.float64


def positive_std(value: float | Sequence[float], who: str) -> float | tuple[float, ...]:
    """One positive std, or a tuple of per-channel ones."""
    std = [float(value)] if isinstance(value, (int, float)) else [float(s) for s in value]
    if not std or min(std) <= 0:
        raise ValueError(f"{who} input_std must be positive, got {value}")
    return std[0] if len(std) == 1 else tuple(std)


def signed_step(grad: Tensor, std: float | tuple[float, ...]) -> Tensor:
    """``sign(grad) / std`` with a per-channel ``std`` applied along dim 1 of ``[B, C, ...]``."""
    step = grad.sign()
    if isinstance(std, tuple):
        shape = (1, len(std)) + (1,) * (grad.dim() - 2)
        return step / torch.tensor(std, dtype=step.dtype, device=step.device).view(shape)
    return step / std


class MahalanobisPreprocessed(Detector):
    """Mahalanobis distance after input preprocessing (Lee et al., NeurIPS 2018, "A simple unified framework
    for detecting out-of-distribution samples and adversarial attacks", eq. 4 and Alg. 1).

    With ``M(x) = min_c (f(x) - mu_c)^T Sigma^-1 (f(x) - mu_c)`` (the tied-covariance squared distance of
    :class:`~lightning_ood.detectors.Mahalanobis`, fitted in its streaming pass on ``features``), the input is
    moved towards the nearest class, ``x' = x - eps * sign(grad_x M(x)) / std``, and the score is ``M(x')``
    (higher = more OOD). ``eps`` is in pixel units and divided by the input normalisation's ``std`` (taken from
    the datamodule when ``input_std`` is ``None``), as ODIN. ``eps = 0`` is plain Mahalanobis, with no extra
    pass.

    Cost: one extra forward + backward and one extra forward of ``batch.model`` per batch (the gradient w.r.t.
    a clone of the inputs only; parameters' ``.grad`` are untouched). Multi-pass, so opt-in.

    Args:
        epsilon: step ``eps >= 0``; 0.0014 (one of the paper's grid {0, 0.0005, 0.001, 0.0014, 0.002, 0.005,
            0.01}, tuned there on validation data).
        ridge: relative covariance ridge, as :class:`Mahalanobis`.
        input_std: per-channel (or one) std of the input normalisation; ``None``: the datamodule's.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features", "inputs", "model"})
    needs_fit: ClassVar[bool] = True
    default_name = "mahalanobis_preprocessed"

    def __init__(
        self,
        epsilon: float = 0.0014,
        ridge: float = 1e-6,
        input_std: float | Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        if epsilon < 0:
            raise ValueError(f"MahalanobisPreprocessed epsilon must be >= 0, got {epsilon}")
        super().__init__(name)
        self.epsilon, self.ridge = epsilon, ridge
        self.input_std = None if input_std is None else positive_std(input_std, "MahalanobisPreprocessed")
        self.gaussian = Mahalanobis(ridge=ridge, name="gaussian")

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, ridge={self.ridge}, input_std={self.input_std}"

    def configure(self, datamodule: object | None) -> None:
        """Take the data's normalisation std when ``input_std`` was left unset."""
        if self.input_std is None and datamodule is not None and hasattr(datamodule, "std"):
            self.input_std = positive_std(datamodule.std, "MahalanobisPreprocessed")

    def reset(self) -> None:
        super().reset()
        self.gaussian.reset()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        self.gaussian.update(batch, targets)

    def finalize(self) -> None:
        self.gaussian.finalize()
        super().finalize()

    def distance(self, features: Tensor) -> Tensor:
        """``[B]`` differentiable ``min_c`` squared tied-Mahalanobis distance of ``[B, D]`` features."""
        g = self.gaussian
        white = (features.to(_F64) - g.center) @ g.whitener
        return squared_distances(white, g.white_means).amin(dim=1)

    def perturb(self, inputs: Tensor, model: ScoringModel) -> Tensor:
        """``[B, ...]`` inputs moved by ``-eps * sign(grad M) / std``, computed outside inference mode."""
        if self.input_std is None:
            raise ValueError(
                "MahalanobisPreprocessed input_std is unset and no datamodule gave its std: set input_std"
            )
        with torch.inference_mode(False), torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.distance(model.forward_outputs(x).features).sum(), x)
        return (x.detach() - self.epsilon * signed_step(grad, self.input_std)).to(inputs.dtype)

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` ``M(x')``; higher = more OOD."""
        if self.epsilon == 0:
            return self.gaussian(batch)
        if batch.inputs is None or batch.model is None:
            raise ValueError("MahalanobisPreprocessed needs `inputs` and `model`")
        perturbed = self.perturb(batch.inputs, batch.model)
        with torch.no_grad():
            return self.distance(batch.model.forward_outputs(perturbed).features)
