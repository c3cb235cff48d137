"""Tiny, randomly initialised diffusion models and classifiers for the diffusion / DiffGuard tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler

from lightning_ood.detectors import Energy
from lightning_ood.frozen import save_method
from lightning_ood.methods import Classifier, DiffGuard, DiffusionModel
from lightning_ood.nets.diffusion import UNetDenoiser, class_conditional_unet

SIZE, CLASSES, TIMESTEPS = 8, 3, 100


def tiny_denoiser(seed: int = 0) -> UNetDenoiser:
    """A class-conditional UNet (3 classes + null) on 8 px grey images with a 100-step linear schedule."""
    torch.manual_seed(seed)
    unet = class_conditional_unet(CLASSES, 1, SIZE, (8, 16), 1, (), 4).eval()
    return UNetDenoiser(unet, DDPMScheduler(num_train_timesteps=TIMESTEPS).alphas_cumprod)


def tiny_checkpoints(root: Path) -> tuple[str, str]:
    """(classifier checkpoint, diffusion checkpoint), both randomly initialised, 3 classes, 8 px grey."""
    torch.manual_seed(0)
    classifier = Classifier(backbone="test_resnet", num_classes=CLASSES, in_chans=1)
    diffusion = DiffusionModel(
        num_classes=CLASSES, in_chans=1, sample_size=SIZE, block_out_channels=(8, 16), norm_num_groups=4,
        num_train_timesteps=TIMESTEPS, beta_schedule="linear", ema_decay=None, score_timesteps=(10,),
    )  # fmt: skip
    return save_method(classifier, root / "classifier.ckpt"), save_method(diffusion, root / "diffusion.ckpt")


def tiny_diffguard(root: Path, **kwargs) -> DiffGuard:
    classifier, diffusion = tiny_checkpoints(root)
    settings = {
        "num_classes": CLASSES, "in_chans": 1, "t_star": 60, "steps": 3, "input_mean": [0.5],
        "input_std": [0.5], "detectors": [Energy()], "combine_with": None,
    }  # fmt: skip
    return DiffGuard(classifier, diffusion, **{**settings, **kwargs}).eval()
