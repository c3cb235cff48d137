"""DiffGuard's named presets: the two settings of the reference code (github.com/cure-lab/DiffGuard), and how a
preset's inversion depth is read on the diffusion model that DiffGuard is given.

The reference code runs DiffGuard in two settings that must not be mixed (docs/diffguard.md, "Presets"):

- ``cfg_latent``: classifier-free guidance of a class-conditional latent model, w = 10, 25 DDIM steps over the
  whole schedule (the last DDIM timestep is 961 of 1000 on the latent model's schedule), the regeneration compared
  with the **input**, classifier-free guidance only inside the classifier's Grad-CAM region (threshold 0.3);
- ``cg_pixel``: classifier guidance (scale 3) of an unconditional pixel model on the linear DDPM schedule,
  a *partial* inversion (90 of 100 DDIM steps: t* = 900 of 1000, the deepest its main experiment goes), predicted
  ``x0`` clamped to the image range in both directions, the regeneration compared with the **unconditional**
  regeneration from the same ``x_{t*}``;
- ``cg_pixel_adaptive``: ``cg_pixel`` as its main experiment runs it, with the two per-image parts: the adaptive
  early stop of the inversion (each image stops at the first level whose PSNR to the input falls below 6.39 dB
  on ``[0, 1]`` images, the reference's 48.5 on its scale; the reference also stops on DISTS, opt-in here) and
  8 random cut-outs of the classifier's guidance input per step (:mod:`~lightning_ood.methods.diffguard_pixel`).

A trained model's noise schedule cannot be changed, so every DDIM step runs on the model's own ``bar alpha``.
A preset's ``t_star`` is a timestep of the schedule the reference model was trained with; on a model with
another schedule, DiffGuard *follows the model* and inverts to the model's timestep whose ``bar alpha`` is
closest to the preset's (the same weight ``sqrt(bar alpha)`` of the image in ``x_{t*}``), never silently to the
same timestep index. A ``t_star`` given by the user is read on the model's own schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler
from torch import Tensor

Guidance = Literal["classifier_free", "classifier"]
Reference = Literal["input", "unconditional"]


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM noise schedule as ``diffusers.DDPMScheduler`` builds it (``beta_schedule``, ``beta_start``,
    ``beta_end`` over ``num_train_timesteps``)."""

    beta_schedule: str
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000

    def alphas_cumprod(self) -> Tensor:
        """``[T]`` float64 ``bar alpha_t``."""
        scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
            beta_start=self.beta_start, beta_end=self.beta_end,
        )  # fmt: skip
        return scheduler.alphas_cumprod.to(torch.float64)


#: The reference latent model's schedule (LDM "linear": sqrt(beta) linear from sqrt(0.0015) to sqrt(0.0195)).
LDM_SCHEDULE = NoiseSchedule("scaled_linear", 0.0015, 0.0195)
#: The reference pixel model's schedule (guided-diffusion "linear": beta linear from 1e-4 to 0.02).
DDPM_LINEAR = NoiseSchedule("linear", 1e-4, 0.02)


@dataclass(frozen=True)
class Preset:
    """One setting of DiffGuard (module doc). ``t_star`` is a timestep of ``schedule``; ``grad_cam``: guide only
    inside the classifier's Grad-CAM region (classifier-free guidance only); ``cutouts``: random crops of the
    classifier-guidance input per step (classifier guidance only); ``early_stop_psnr``: the inversion's adaptive
    early stop, in dB on ``[0, 1]`` images (``None``: off)."""

    name: str
    guidance: Guidance
    guidance_scale: float
    classifier_scale: float
    reference: Reference
    t_star: int
    steps: int
    schedule: NoiseSchedule
    clip_inversion: bool
    grad_cam: bool
    cutouts: int = 0
    early_stop_psnr: float | None = None


PRESETS: dict[str, Preset] = {
    "cfg_latent": Preset(
        "cfg_latent", "classifier_free", 10.0, 3.0, "input", 961, 25, LDM_SCHEDULE, False, True
    ),
    "cg_pixel": Preset(
        "cg_pixel", "classifier", 10.0, 3.0, "unconditional", 900, 90, DDPM_LINEAR, True, False
    ),
    "cg_pixel_adaptive": Preset(
        "cg_pixel_adaptive",
        "classifier",
        10.0,
        3.0,
        "unconditional",
        900,
        90,
        DDPM_LINEAR,
        True,
        False,
        8,
        6.39,
    ),
}


@dataclass(frozen=True)
class Settings:
    """A preset resolved on one diffusion model: ``t_star`` is a timestep of the model's schedule, ``alpha_star``
    its ``bar alpha``; ``t_star_from`` says how it was obtained (``"preset"``, ``"preset, matched bar alpha"``,
    ``"timestep"``, ``"fraction"``)."""

    preset: str
    guidance: Guidance
    guidance_scale: float
    classifier_scale: float
    reference: Reference
    t_star: int
    steps: int
    clip_inversion: bool
    grad_cam: bool
    cam_threshold: float
    alpha_star: float
    t_star_from: str
    cutouts: int = 0
    early_stop_psnr: float | None = None
    early_stop_dists: float | None = None

    @property
    def early_stop(self) -> bool:
        """Whether the inversion stops early per image (a PSNR or a DISTS threshold is set and positive)."""
        return any(v is not None and v > 0 for v in (self.early_stop_psnr, self.early_stop_dists))


def same_schedule(a: Tensor, b: Tensor) -> bool:
    """Whether two ``bar alpha`` sequences are the same schedule (same length, equal to 1e-6 relative)."""
    return len(a) == len(b) and torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-12)


def matching_timestep(alphas: Tensor, alpha: float) -> int:
    """The timestep (>= 1) of ``alphas`` whose ``bar alpha`` is closest to ``alpha`` in log scale."""
    distance = (alphas.double().log() - math.log(alpha)).abs()
    distance[0] = math.inf
    return int(distance.argmin())


def model_timestep(t_star: int | float, num_timesteps: int) -> tuple[int, str]:
    """A user's ``t_star`` on a model of ``num_timesteps`` steps: an ``int`` is a timestep, a ``float`` in
    ``(0, 1]`` a fraction of the schedule (``min(round(f T), T - 1)``: ``1.0`` is ``T - 1``, full inversion)."""
    if isinstance(t_star, bool) or not isinstance(t_star, int | float):
        raise ValueError(f"DiffGuard.t_star must be an int timestep or a float fraction, got {t_star!r}")
    if isinstance(t_star, float):
        if not 0.0 < t_star <= 1.0:
            raise ValueError(
                f"DiffGuard.t_star {t_star} as a float is a fraction of the schedule and must be in (0, 1]; give "
                "an int for a timestep"
            )
        return min(round(t_star * num_timesteps), num_timesteps - 1), "fraction"
    if not 1 <= t_star < num_timesteps:
        raise ValueError(f"DiffGuard.t_star must be a timestep in [1, {num_timesteps - 1}], got {t_star}")
    return t_star, "timestep"


def resolve(preset: str, overrides: dict[str, Any], alphas: Tensor) -> Settings:
    """``preset`` with the non-``None`` ``overrides`` (``guidance``, ``guidance_scale``, ``classifier_scale``,
    ``reference``, ``t_star``, ``steps``, ``clip_inversion``, ``grad_cam``, ``cam_threshold``, ``cutouts``,
    ``early_stop_psnr``, ``early_stop_dists``) on a model whose schedule is ``alphas`` (``[T]``). Options that
    belong to one kind of guidance (``grad_cam``: classifier-free; ``cutouts``: classifier) follow a changed
    ``guidance`` unless given; given for the other kind, they are an error. ``early_stop_psnr: 0`` turns the
    preset's early stop off.

    Raises:
        ValueError: an unknown preset or option, or values that do not fit the model.
    """
    if preset not in PRESETS:
        raise ValueError(f"DiffGuard.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    base = PRESETS[preset]
    given = {k: v for k, v in overrides.items() if v is not None}
    extra = {"t_star", "cam_threshold", "early_stop_dists"}
    unknown = set(given) - extra - set(Preset.__dataclass_fields__)
    if unknown:
        raise ValueError(f"DiffGuard: unknown preset options {sorted(unknown)}")
    t_star = given.pop("t_star", None)
    threshold = float(given.pop("cam_threshold", 0.3))
    dists = given.pop("early_stop_dists", None)
    if "guidance" in given and "grad_cam" not in given and given["guidance"] != "classifier_free":
        given["grad_cam"] = (
            False  # the mask belongs to classifier-free guidance: a preset's mask goes with it
        )
    if "guidance" in given and "cutouts" not in given and given["guidance"] != "classifier":
        given["cutouts"] = 0  # the cut-outs belong to classifier guidance
    chosen = replace(base, **given)
    if chosen.grad_cam and chosen.guidance != "classifier_free":
        raise ValueError(
            "DiffGuard.grad_cam masks classifier-free guidance (the reference code's latent setting); with "
            "guidance: classifier set grad_cam: false"
        )
    if isinstance(chosen.cutouts, bool) or not isinstance(chosen.cutouts, int) or chosen.cutouts < 0:
        raise ValueError(f"DiffGuard.cutouts must be an int >= 0, got {chosen.cutouts!r}")
    if chosen.cutouts and chosen.guidance != "classifier":
        raise ValueError(
            "DiffGuard.cutouts crops the classifier-guidance input (the reference code's pixel setting); with "
            "guidance: classifier_free set cutouts: 0"
        )
    if dists is not None and not 0.0 <= dists <= 1.0:
        raise ValueError(f"DiffGuard.early_stop_dists is a 1 - DISTS similarity in [0, 1], got {dists}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"DiffGuard.cam_threshold must be in [0, 1), got {threshold}")
    if t_star is not None:
        t, how = model_timestep(t_star, len(alphas))
    elif same_schedule(alphas, base.schedule.alphas_cumprod()):
        t, how = base.t_star, "preset"
    else:
        t = matching_timestep(alphas, float(base.schedule.alphas_cumprod()[base.t_star]))
        how = "preset, matched bar alpha"
    if chosen.steps < 1 or chosen.steps > t:
        raise ValueError(f"DiffGuard.steps must be in [1, t_star = {t}], got {chosen.steps}")
    return Settings(
        preset, chosen.guidance, chosen.guidance_scale, chosen.classifier_scale, chosen.reference, t,
        chosen.steps, chosen.clip_inversion, chosen.grad_cam, threshold, float(alphas[t]), how, chosen.cutouts,
        chosen.early_stop_psnr, dists,
    )  # fmt: skip


__all__ = ["DDPM_LINEAR", "LDM_SCHEDULE", "PRESETS", "NoiseSchedule", "Preset", "Settings", "resolve"]
