"""ODIN: temperature scaling plus an input perturbation that raises the softmax score of ID images more."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs, ScoringModel
from lightning_ood.precision import at_least_float32


class ODIN(Detector):
    """ODIN (Liang et al., ICLR 2018, "Enhancing the reliability of out-of-distribution image detection in
    neural networks", eq. 1-2). Higher = more OOD; range ``[-1, -1/C]``.

    With ``S(x; T) = max_c softmax(f(x) / T)_c`` (predicted class ``y_hat``) the input is perturbed towards a
    higher score, ``x' = x - eps * sign(-grad_x log S_y_hat(x; T)) / std`` (eq. 2), and the score is
    ``-S(x'; T)``. ``sign`` is the true sign (a zero gradient moves nothing; the official code maps 0 to +1).

    Units: the paper's ``eps`` is a step in [0, 1] pixel space. The method's inputs are *normalised* images
    ``(pixel - mean) / std``, where that step is ``eps / std`` (as the official code does). By default
    (``input_std: null``) the std is taken from the datamodule when testing starts, so ``eps`` is the paper's
    step in pixel units; a value set here is used as it is (1.0 applies ``eps`` directly in normalised space).

    Cost: one extra forward + backward and one extra forward of ``batch.model`` per batch, so ODIN is the
    exception to "one forward pass, many detectors". The gradient is taken with :func:`torch.autograd.grad`
    w.r.t. a clone of the inputs only, so the model's parameters' ``.grad`` are never touched; its train/eval
    mode is left as it is (eval in a test loop). It works inside ``torch.inference_mode()`` (Lightning's test
    loop) by leaving inference mode locally.

    Args:
        temperature: ``T > 0``; the paper uses 1000.
        epsilon: perturbation magnitude ``eps >= 0``; the paper tunes it on validation data (0.0014 for
            DenseNet on CIFAR-10). 0 gives temperature-scaled MSP from ``batch.logits`` with no extra pass.
        input_std: per-channel (or one) std of the input normalisation, dividing the step (see Units);
            ``None``: the datamodule's ``std``.
        name: log key; defaults to ``"odin"``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"logits", "inputs", "model"})

    def __init__(
        self,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        input_std: float | Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"ODIN temperature must be > 0, got {temperature}")
        if epsilon < 0:
            raise ValueError(f"ODIN epsilon must be >= 0, got {epsilon}")
        super().__init__(name)
        self.temperature = temperature
        self.epsilon = epsilon
        self.input_std: float | tuple[float, ...] | None = None if input_std is None else _std(input_std)

    def configure(self, datamodule: object | None) -> None:
        """Take the data's normalisation std when ``input_std`` was left unset."""
        if self.input_std is None and datamodule is not None and hasattr(datamodule, "std"):
            self.input_std = _std(datamodule.std)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, epsilon={self.epsilon}, input_std={self.input_std}"

    def _msp(self, logits: Tensor) -> Tensor:
        return (at_least_float32(logits) / self.temperature).softmax(dim=1).amax(dim=1)

    def perturb(self, inputs: Tensor, model: ScoringModel) -> Tensor:
        """``[B, ...]`` perturbed inputs ``x'`` (eq. 2), computed outside inference mode, detached."""
        with torch.inference_mode(False), torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            logits = at_least_float32(model.forward_outputs(x).logits) / self.temperature
            # -log S_y_hat(x; T): cross-entropy against the predicted class.
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        step = grad.sign()
        if self.input_std is None:
            raise ValueError(
                "ODIN input_std is unset and no datamodule gave its std: set input_std to the normalisation's std"
            )
        if isinstance(self.input_std, tuple):  # per-channel: dim 1 of [B, C, ...]
            shape = (1, len(self.input_std)) + (1,) * (inputs.dim() - 2)
            step = step / torch.tensor(self.input_std, dtype=step.dtype, device=step.device).view(shape)
        else:
            step = step / self.input_std
        return (x.detach() - self.epsilon * step).to(inputs.dtype)

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` scores ``-S(x'; T)`` for ``batch.inputs`` ``[B, ...]``; higher = more OOD."""
        if self.epsilon == 0:
            return -self._msp(batch.logits)
        if batch.inputs is None or batch.model is None:
            raise ValueError("ODIN needs `inputs` and `model`")
        perturbed = self.perturb(batch.inputs, batch.model)
        with torch.no_grad():
            return -self._msp(batch.model.forward_outputs(perturbed).logits)


def _std(value: float | Sequence[float]) -> float | tuple[float, ...]:
    std = [float(value)] if isinstance(value, (int, float)) else [float(s) for s in value]
    if not std or min(std) <= 0:
        raise ValueError(f"ODIN input_std must be positive, got {value}")
    return std[0] if len(std) == 1 else tuple(std)
