"""DiffGuard's checks of its resolved settings against the diffusion model and its own options, with what to do
when they do not fit (run once, when DiffGuard is built)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_ood.methods.diffguard_presets import Settings
from lightning_ood.methods.diffguard_scores import MEASURES


def check_settings(h: Any, s: Settings, den: nn.Module) -> None:
    """Raise ``ValueError`` where DiffGuard's hyperparameters ``h`` and resolved settings ``s`` do not fit the
    diffusion model ``den``."""
    if s.guidance == "classifier_free" and not den.conditional:
        raise ValueError(
            f"DiffGuard.guidance 'classifier_free' needs a class-conditional diffusion model, but {h.diffusion} "
            f"is unconditional: use guidance: classifier (the protected classifier guides it; preset cg_pixel)"
        )
    if h.class_map is not None and len(h.class_map) != h.num_classes:
        raise ValueError(f"DiffGuard.class_map has {len(h.class_map)} entries for {h.num_classes} classes")
    targets = h.class_map or list(range(h.num_classes))
    if s.guidance == "classifier_free" and max(targets) >= den.num_classes:
        raise ValueError(
            f"DiffGuard: classifier classes map to diffusion classes up to {max(targets)}, but the diffusion "
            f"model has {den.num_classes}; set model.init_args.class_map"
        )
    unused = sorted(set(range(den.num_classes)) - set(targets)) if den.conditional else []
    if unused:  # e.g. a ten-class model protecting an open-set split's six-class classifier
        rank_zero_warn(
            f"DiffGuard: the diffusion model {h.diffusion} has {den.num_classes} classes, but the classifier's "
            f"{h.num_classes} classes use only {den.num_classes - len(unused)} of them (unused: {unused}). If it "
            f"was trained on images of the unused classes and they are among the OOD test sets (an open-set "
            f"split), DiffGuard's scores on them are optimistic: train the diffusion model on the ID classes "
            f"only (--data of the same benchmark, as configs/grids/reference.yaml does)"
        )
    measures = MEASURES + tuple(h.perceptual or ())
    if h.combine_measure not in measures:
        raise ValueError(f"DiffGuard.combine_measure must be one of {measures}, got {h.combine_measure!r}")
    if s.early_stop and not den.clip_sample:
        raise ValueError(
            f"DiffGuard's adaptive early stop compares the inversion's x_t with the input in pixels, but "
            f"{h.diffusion} diffuses in a latent space: set early_stop_psnr: 0 (and early_stop_dists: null)"
        )
    if h.diffusion_batch_size is not None and h.diffusion_batch_size < 1:
        raise ValueError(f"DiffGuard.diffusion_batch_size must be >= 1, got {h.diffusion_batch_size}")


__all__ = ["check_settings"]
