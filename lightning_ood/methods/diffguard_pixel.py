"""What DiffGuard's classifier-guided pixel setting (preset ``cg_pixel``) adds to the round trip: the classifier
guidance itself, its random **cut-outs** of the guidance input, and the **adaptive early stop** of the inversion.

As the reference code (github.com/cure-lab/DiffGuard, read, not copied) runs it:

- **Guidance.** ``eps -> eps - s sqrt(1 - bar alpha_t) grad_{x_t} sum log p(y_hat | crops(b))``, ``b = f x0_hat +
  (1 - f) x_t`` with ``f = sqrt(1 - bar alpha_t)``: the classifier sees a blend of the predicted clean image and
  the noisy one, never the diffusion network's graph (``eps`` is a constant of the gradient).
- **Cut-outs.** ``cutouts`` random square crops of the blend per step, each of side between
  :data:`CUTOUT_MIN_FRACTION` of the image's shorter side and all of it (the reference: 224 to 256 px of a 256 px
  image), resized back to the image's size with nearest-neighbour interpolation (``F.interpolate``'s default, as
  there), all classified; the log-probabilities of ``y_hat`` are summed over the crops. The crops are drawn from
  a generator seeded with :data:`CUTOUT_SEED` at the start of each regeneration, one set per DDIM step, the same
  for every image of the batch, so a batch gets the scores of its images one at a time.
- **Adaptive early stop.** Each image's inversion stops at the first level whose ``x_t`` has drifted far enough
  from the input: its PSNR to the input falls below ``early_stop_psnr`` dB, or (with piq's DISTS and its VGG16
  weights) ``1 - DISTS`` below ``early_stop_dists``. The regeneration then starts from that level. PSNR here is
  the usual one of images in ``[0, 1]`` (peak 1). The reference computes ``20 log10(255 / rmse)`` on images in
  ``[-1, 1]``, which is ``20 log10(127.5) = 42.11`` dB higher: its threshold 48.5 is 6.39 dB here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.methods.diffguard_scores import perceptual_distance

#: The smallest cut-out side, as a fraction of the image's shorter side (the reference: 224 of 256 px).
CUTOUT_MIN_FRACTION = 224 / 256
#: The cut-outs' generator seed, reset at the start of every regeneration (the reference resets its generator
#: per image).
CUTOUT_SEED = 0
#: ``20 log10(127.5)``: the reference's PSNR (peak 255 on images in ``[-1, 1]``) minus the usual one.
REFERENCE_PSNR_OFFSET_DB = 42.1102


def cutout_boxes(
    steps: int, count: int, height: int, width: int, seed: int = CUTOUT_SEED
) -> list[list[tuple[int, int, int]]]:
    """``count`` square crops ``(side, top, left)`` per DDIM step, ``steps`` lists, from a generator seeded with
    ``seed``: side ``int(u * (max - min) + min)`` with ``u ~ U[0, 1)``, ``max`` the shorter side, ``min``
    :data:`CUTOUT_MIN_FRACTION` of it; the offsets uniform over the positions that fit."""
    g = torch.Generator().manual_seed(seed)
    longest = min(height, width)
    shortest = max(1, min(longest, round(CUTOUT_MIN_FRACTION * longest)))
    boxes = []
    for _ in range(steps):
        step = []
        for _ in range(count):
            side = int(float(torch.rand((), generator=g)) * (longest - shortest) + shortest)
            left = int(torch.randint(0, width - side + 1, (), generator=g))
            top = int(torch.randint(0, height - side + 1, (), generator=g))
            step.append((side, top, left))
        boxes.append(step)
    return boxes


def apply_cutouts(images: Tensor, boxes: list[tuple[int, int, int]]) -> Tensor:
    """``[len(boxes) * B, C, H, W]``: each box's crop of every image, resized back to ``H x W`` (nearest), box
    after box (the reference's order: crops of the first box for the whole batch, then the second, ...)."""
    size = tuple(images.shape[-2:])
    return torch.cat(
        [
            F.interpolate(images[:, :, top : top + side, left : left + side], size=size)
            for side, top, left in boxes
        ]
    )


def classifier_guidance(
    classify: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    preds: Tensor,
    scale: float,
    boxes: dict[int, list[tuple[int, int, int]]] | None = None,
):
    """The ``eps`` correction of classifier guidance (module doc) for a batch predicted as ``preds``.

    Args:
        classify: ``[N, C, H, W]`` images in ``[-1, 1]`` -> logits ``[N, K]`` (the protected classifier).
        decode: the diffused space -> images in ``[-1, 1]`` (pixel models: a crop of the padding).
        preds: ``[B]`` the classes to guide towards.
        scale: ``s``.
        boxes: the cut-outs of each step, by the step's timestep (``None``: the whole blend, no cut-outs).
    """

    def correction(z: Tensor, t: Tensor, eps: Tensor, alpha: float, rows: Tensor | None = None) -> Tensor:
        f = (1.0 - alpha) ** 0.5
        classes = preds if rows is None else preds[rows]
        with torch.inference_mode(False), torch.enable_grad():
            x_t = z.detach().clone().requires_grad_(True)
            eps_const = eps.detach().clone()
            x0 = (x_t - f * eps_const) / alpha**0.5
            images = decode(f * x0 + (1.0 - f) * x_t)
            crops = boxes[int(t[0])] if boxes is not None else None
            if crops:
                images = apply_cutouts(images, crops)
            logits = classify(images).float()
            targets = classes.clone().repeat(len(logits) // len(classes)).view(-1, 1)
            log_p = logits.log_softmax(dim=1).gather(1, targets).sum()
            (grad,) = torch.autograd.grad(log_p, x_t)
        return eps - scale * f * grad.detach()

    return correction


def early_stop_rule(
    inputs: Tensor,
    decode: Callable[[Tensor], Tensor],
    psnr_db: float | None,
    dists_threshold: float | None = None,
    dists: nn.Module | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The adaptive early stop (module doc) of a batch whose images are ``inputs`` (``[B, C, H, W]`` in
    ``[-1, 1]``): ``(x_t [n, ...], rows [n]) -> [n] bool``, stop where ``PSNR(x_t, input) < psnr_db`` (images
    mapped to ``[0, 1]``) or ``1 - DISTS(x_t, input) < dists_threshold`` (``x_t`` clamped to the image range
    for DISTS). ``None`` or ``<= 0`` turns a criterion off."""
    if dists_threshold is not None and dists is None:
        raise ValueError("early_stop_rule: a DISTS threshold needs the DISTS metric")

    def stop(z: Tensor, rows: Tensor) -> Tensor:
        x, ref = decode(z).float(), inputs[rows].float()
        out = torch.zeros(len(rows), dtype=torch.bool, device=z.device)
        if psnr_db is not None and psnr_db > 0:
            mse = ((x - ref) / 2).pow(2).flatten(1).mean(1)
            out |= 10 * torch.log10(1.0 / mse) < psnr_db
        if dists_threshold is not None and dists_threshold > 0:
            out |= 1 - perceptual_distance(dists, x.clamp(-1, 1), ref) < dists_threshold
        return out

    return stop


__all__ = [
    "CUTOUT_MIN_FRACTION",
    "CUTOUT_SEED",
    "REFERENCE_PSNR_OFFSET_DB",
    "apply_cutouts",
    "classifier_guidance",
    "cutout_boxes",
    "early_stop_rule",
]
