"""The feature-matching attack of Adaloglou et al. (TMLR 2024, arXiv 2303.05828, Sec. 5 and their notebook
``clip-ood-adversarial-examples.ipynb``): an OOD image is perturbed until its embedding matches the embedding of
an ID training image, so every score on the embedding takes it for ID.

For an OOD image ``y`` and a target ID image ``x_t`` (pixels in [0, 1]) and an encoder ``f``::

    min_delta  -cos(f(y + delta), f(x_t)) + lambda * (mean((d_x delta)^2) + mean((d_y delta)^2))

with Adam (lr 1e-3, 250 steps), ``delta`` initialised from ``N(0, 1e-3^2)`` and ``y + delta`` clamped to the
valid pixel range [0, 1] after every step (in the data's normalised space that is ``(0 - mean) / std`` to
``(1 - mean) / std``). ``lambda = 5e3`` gives "smooth" perturbations, ``lambda = 0`` "patchy" ones. ``d_x``,
``d_y`` are forward differences with a zero last column / row (torchmetrics' ``image_gradients``, as the
reference), the means over every element of the image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: ``pixels [B, C, H, W] in [0, 1] -> embeddings [B, D]``, differentiable.
Encode = Callable[[Tensor], Tensor]


class AttackResult(NamedTuple):
    """``delta``: ``[N, C, H, W]`` perturbations in pixel units (``images + delta`` lies in [0, 1]);
    ``cos_before`` / ``cos_after``: ``[N]`` cosine similarity to the target's embedding before and after."""

    delta: Tensor
    cos_before: Tensor
    cos_after: Tensor


def smoothness(delta: Tensor) -> Tensor:
    """``[B]`` ``mean((d_x delta)^2) + mean((d_y delta)^2)`` per image, differences zero-padded at the end."""
    dy = F.pad(delta[..., 1:, :] - delta[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(delta[..., :, 1:] - delta[..., :, :-1], (0, 1, 0, 0))
    return dy.square().flatten(1).mean(1) + dx.square().flatten(1).mean(1)


class FeatureMatchingAttack:
    """Batched, seeded feature-matching attack (module doc) on any differentiable encoder.

    Each image's objective is optimised on its own (the batch loss is the *sum* of per-image losses and Adam is
    element-wise), so the result does not depend on the batch size or on how images are split across
    processes. Gradients flow to ``delta`` only (``torch.autograd.grad``): the encoder's parameters and their
    ``.grad`` are untouched.

    Args:
        steps: Adam steps.
        lr: Adam learning rate, in pixel units (images in [0, 1]).
        init_std: standard deviation of the initial ``delta``.
        smoothness: ``lambda``, the weight of the perturbation's squared image gradients (5e3 smooth, 0 patchy).
        batch_size: images attacked together.
    """

    def __init__(
        self,
        steps: int = 250,
        lr: float = 1e-3,
        init_std: float = 1e-3,
        smoothness: float = 5e3,
        batch_size: int = 64,
    ) -> None:
        if steps < 0 or lr <= 0 or init_std < 0 or smoothness < 0 or batch_size < 1:
            raise ValueError(
                "FeatureMatchingAttack: steps >= 0, lr > 0, init_std >= 0, smoothness >= 0 and batch_size >= 1; got "
                f"{steps}, {lr}, {init_std}, {smoothness}, {batch_size}"
            )
        self.steps, self.lr, self.init_std = steps, lr, init_std
        self.smoothness, self.batch_size = smoothness, batch_size

    def initial_noise(self, shape: tuple[int, ...], seed: int) -> Tensor:
        """``N(0, init_std^2)`` noise of ``shape`` from a CPU generator seeded with ``seed`` (reproducible)."""
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * self.init_std

    def __call__(
        self, encode: Encode, images: Tensor, targets: Tensor, noise: Tensor | None = None
    ) -> AttackResult:
        """Attack ``images`` ``[N, C, H, W]`` (pixels in [0, 1]) towards the embeddings of ``targets`` (same
        shape), batch by batch; ``noise``: the initial ``delta`` (default :meth:`initial_noise` with seed 0)."""
        if images.shape != targets.shape:
            raise ValueError(
                f"images {tuple(images.shape)} and targets {tuple(targets.shape)} differ in shape"
            )
        noise = self.initial_noise(tuple(images.shape), 0) if noise is None else noise
        parts = [
            self.attack_batch(encode, images[i : i + self.batch_size], targets[i : i + self.batch_size],
                              noise[i : i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        ]  # fmt: skip
        if not parts:
            empty = images.new_empty(0)
            return AttackResult(images.new_zeros(images.shape), empty, empty)
        return AttackResult(*(torch.cat(p) for p in zip(*parts, strict=True)))

    def attack_batch(self, encode: Encode, images: Tensor, targets: Tensor, noise: Tensor) -> AttackResult:
        """One batch: ``images``, ``targets``, ``noise`` ``[B, C, H, W]`` on the encoder's device."""
        with torch.inference_mode(False), torch.enable_grad():
            images, targets = images.detach().clone(), targets.detach().clone()
            with torch.no_grad():
                goal = encode(targets).detach().float()
                before = F.cosine_similarity(encode(images).float(), goal, dim=1)
            delta = _clamped(images, noise.to(images).clone()).requires_grad_()
            optimizer = torch.optim.Adam([delta], lr=self.lr)
            for _ in range(self.steps):
                cos = F.cosine_similarity(encode(images + delta).float(), goal, dim=1)
                loss = (-cos + self.smoothness * smoothness(delta.float())).sum()
                (delta.grad,) = torch.autograd.grad(loss, delta)
                optimizer.step()
                with torch.no_grad():
                    delta.copy_(_clamped(images, delta))
            with torch.no_grad():
                after = F.cosine_similarity(encode(images + delta).float(), goal, dim=1)
        return AttackResult(delta.detach(), before.detach(), after.detach())


def _clamped(images: Tensor, delta: Tensor) -> Tensor:
    """``delta`` such that ``images + delta`` lies in [0, 1]."""
    return (images + delta).clamp(0.0, 1.0) - images
