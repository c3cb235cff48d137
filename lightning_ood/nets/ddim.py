"""Deterministic DDIM (Song et al., ICLR 2021, eq. 12 with eta = 0): inversion, regeneration and sampling, on
whole batches, never building an autograd graph through the noise-prediction network.

One DDIM step moves ``x_a`` (noise level ``bar alpha_a``) to level ``bar alpha_b`` along the predicted noise:
``x0_hat = (x_a - sqrt(1 - bar alpha_a) eps) / sqrt(bar alpha_a)``, ``x_b = sqrt(bar alpha_b) x0_hat +
sqrt(1 - bar alpha_b) eps``. Inversion walks ``t_0 = 0 < t_1 < ... < t_S = t*`` upwards with ``eps`` evaluated
at the lower level (the usual first-order approximation of the ODE's inverse), regeneration walks back down
with ``eps`` at the upper level; both use ``S`` network evaluations per image (times the guidance's branches).
The input is taken as ``x_{t_0}`` and the output is ``x_{t_0}``, so an exact ODE solver would return the input.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ood.nets.diffusion import Denoiser

#: ``(x_t [n, ...], t [n], eps [n, ...] from the network, bar alpha_t, rows) -> eps`` used for the step:
#: classifier guidance adds the classifier's gradient; identity without it. ``rows`` (keyword, ``[n]`` indices
#: into the batch, or ``None`` for all rows) says which images of the batch ``x_t`` holds when only some of them
#: are regenerating at this step (per-image start levels, :func:`ddim_regenerate`).
EpsCorrection = Callable[..., Tensor]
#: ``(x_t [n, ...] of the images still inverting, their rows [n] in the batch) -> [n] bool``: whether each image
#: stops its inversion at this level (:func:`ddim_invert_until`).
StopRule = Callable[[Tensor, Tensor], Tensor]


def ddim_timesteps(t_star: int, steps: int) -> list[int]:
    """``[0, t_1, ..., t_star]``: ``steps`` evenly spaced intervals from 0 to ``t_star`` (integer timesteps)."""
    if steps < 1 or t_star < 1:
        raise ValueError(f"DDIM needs steps >= 1 and t_star >= 1, got steps={steps}, t_star={t_star}")
    if steps > t_star:
        raise ValueError(f"steps ({steps}) cannot exceed t_star ({t_star}): timesteps would repeat")
    return [round(i * t_star / steps) for i in range(steps + 1)]


def ddim_step(x: Tensor, eps: Tensor, alpha_from: float, alpha_to: float, clip: bool = False) -> Tensor:
    """One deterministic DDIM step from level ``bar alpha_from`` to ``bar alpha_to`` (either direction).

    ``clip``: clamp the predicted ``x0`` to ``[-1, 1]`` (pixel models while regenerating: the reference code's
    ``clip_denoised``, diffusers' DDIM ``clip_sample``). Near ``t = T`` ``bar alpha`` is close to 0 and
    ``x0 = (x - sqrt(1 - bar alpha) eps) / sqrt(bar alpha)`` multiplies any error of ``eps`` by up to
    ``1 / sqrt(bar alpha)`` (about 1e5 at the end of the cosine schedule); the clamp keeps it on the image range.
    """
    x0 = (x - (1.0 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - alpha_from**0.5 * x0) / (
            1.0 - alpha_from
        ) ** 0.5  # the noise consistent with the clamped x0
    return alpha_to**0.5 * x0 + (1.0 - alpha_to) ** 0.5 * eps


def guided_noise(
    denoiser: Denoiser, x: Tensor, t: int, labels: Tensor | None, scale: float, mask: Tensor | None = None
) -> Tensor:
    """``eps`` with classifier-free guidance (Ho & Salimans, 2022): ``eps_null + scale (eps_y - eps_null)``;
    ``scale = 1`` is the plain conditional model, ``labels = None`` the unconditional one. Both branches run as
    one batch of ``2B``. ``mask`` (``[B, 1, h, w]`` in the diffused space, 0 / 1): guided where it is 1,
    ``eps_null`` elsewhere (DiffGuard's Grad-CAM mask)."""
    tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
    if labels is None or (scale == 1.0 and mask is None):
        return denoiser.noise(x, tt, labels)
    null = torch.full_like(labels, denoiser.num_classes)
    eps = denoiser.noise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
    eps_y, eps_null = eps.chunk(2)
    guided = eps_null + scale * (eps_y - eps_null)
    return guided if mask is None else torch.where(mask > 0.5, guided, eps_null)


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    z: Tensor,
    timesteps: list[int],
    labels: Tensor | None = None,
    scale: float = 1.0,
    clip: bool = False,
) -> Tensor:
    """``x_{t_0}`` -> ``x_{t_S}`` along ``timesteps`` (increasing), ``eps`` conditioned on ``labels`` (None:
    unconditional, as in both settings of the reference code). ``clip``: clamp each step's predicted ``x0`` to
    ``[-1, 1]`` (:func:`ddim_step`; the reference code's pixel setting clamps its inversion too)."""
    a = denoiser.alphas_cumprod
    for t_from, t_to in itertools.pairwise(timesteps):
        eps = guided_noise(denoiser, z, t_from, labels, scale)
        z = ddim_step(z, eps, float(a[t_from]), float(a[t_to]), clip and t_from > 0)
    return z


@torch.no_grad()
def ddim_invert_until(
    denoiser: Denoiser, z: Tensor, timesteps: list[int], stop: StopRule, clip: bool = False
) -> tuple[Tensor, Tensor]:
    """Unconditional :func:`ddim_invert` with a per-image **adaptive early stop**: after each step, ``stop``
    sees the images still inverting; an image it stops keeps that level's ``x_t`` and walks no further (the
    reference code's pixel setting, which runs it one image at a time; here the batch runs together and each
    image gets exactly what it would alone). Returns ``(x_stop [B, ...], level [B])``, ``level[i]`` the index
    into ``timesteps`` where image ``i`` stopped (``len(timesteps) - 1``: it ran to the end)."""
    a = denoiser.alphas_cumprod
    z = z.clone()
    last = len(timesteps) - 1
    level = torch.full((len(z),), last, dtype=torch.long, device=z.device)
    running = torch.arange(len(z), device=z.device)
    for k, (t_from, t_to) in enumerate(itertools.pairwise(timesteps), start=1):
        if len(running) == 0:
            break
        eps = guided_noise(denoiser, z[running], t_from, None, 1.0)
        moved = ddim_step(z[running], eps, float(a[t_from]), float(a[t_to]), clip and t_from > 0)
        z[running] = moved
        if k < last:  # at the last level every image ends anyway
            stopped = stop(moved, running).to(torch.bool)
            level[running[stopped]] = k
            running = running[~stopped]
    return z, level


def ddim_regenerate(
    denoiser: Denoiser,
    z: Tensor,
    timesteps: list[int],
    labels: Tensor | None,
    scale: float = 1.0,
    correction: EpsCorrection | None = None,
    progress: bool = False,
    clip: bool = False,
    mask: Tensor | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """``x_{t_S}`` -> ``x_{t_0}`` along ``timesteps`` (given increasing; walked downwards).

    ``clip``: clamp each step's predicted ``x0`` to ``[-1, 1]`` (:func:`ddim_step`).

    ``labels`` / ``scale`` / ``mask``: classifier-free guidance (:func:`guided_noise`). ``correction``: an extra
    change of ``eps`` per step (classifier guidance); it may use autograd on its own inputs, the network's ``eps``
    is computed without gradients.

    ``start``: ``[B]`` per-image start levels (indices into ``timesteps``, as :func:`ddim_invert_until` returns):
    image ``i`` is at level ``timesteps[start[i]]`` and takes only the steps below it; at each step the network
    runs on the images that are regenerating (``None``: every image starts at ``t_S``).
    """
    a = denoiser.alphas_cumprod
    pairs = list(zip(timesteps[::-1][:-1], timesteps[::-1][1:], strict=True))
    bar = tqdm(pairs, desc="DDIM", disable=not progress, leave=False, file=sys.stderr)
    if start is not None:
        z = z.clone()
    for j, (t_from, t_to) in zip(range(len(pairs), 0, -1), bar, strict=True):
        rows = None if start is None else torch.nonzero(start >= j).flatten()
        if rows is not None and len(rows) == 0:
            continue
        x = z if rows is None else z[rows]
        with torch.no_grad():
            eps = guided_noise(
                denoiser, x, t_from, _rows(labels, rows), scale, _rows(mask, rows)
            )  # fmt: skip
        if correction is not None:
            tt = torch.full((len(x),), t_from, dtype=torch.long, device=z.device)
            eps = correction(x, tt, eps, float(a[t_from]), rows=rows)
        with torch.no_grad():
            moved = ddim_step(x, eps, float(a[t_from]), float(a[t_to]), clip)
        if rows is None:
            z = moved
        else:
            z[rows] = moved
    return z


def _rows(x: Tensor | None, rows: Tensor | None) -> Tensor | None:
    return x if x is None or rows is None else x[rows]


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    labels: Tensor | None,
    steps: int = 50,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Samples in the diffused space from pure noise at ``t = T - 1`` (``shape`` = ``[B, ...]``), conditioned on
    ``labels`` with classifier-free guidance ``scale``."""
    device = denoiser.alphas_cumprod.device
    z = torch.randn(shape, generator=generator, device="cpu").to(device)
    timesteps = ddim_timesteps(denoiser.num_train_timesteps - 1, steps)
    return ddim_regenerate(
        denoiser, z, timesteps, labels, scale, progress=progress, clip=denoiser.clip_sample
    )
