"""Tiny instances of every method that fits something, their data, and the rows of a test run: for the tests of
derived state (fits, attacked sets, standardisation, search) on one and on N processes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from lightning_ood.callbacks import OODEvaluation
from lightning_ood.data import AuxSetSpec, IDSetSpec, OODDataModule, OODSetSpec
from lightning_ood.detectors import KNN, MSP, Energy, Mahalanobis
from lightning_ood.frozen import save_method
from lightning_ood.methods import SSOD, Classifier, DiffGuard, FrozenEncoder, HeatmapOOD, OODformer, OODMethod
from lightning_ood.nets.encoders import CheckpointEncoder

TINY_SSOD = {
    "backbone": "resnet10t_os4",
    "in_chans": 1,
    "img_size": 16,
    "backbone_kwargs": {"channels": [8, 8, 16, 16]},
}
TINY_VIT = {"backbone": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "in_chans": 1,
            "backbone_kwargs": {"embed_dim": 16, "depth": 2, "num_heads": 2}}  # fmt: skip


def tiny_data(size: int = 16, classes: list[int] | None = None, n: int = 25, **kwargs: Any) -> OODDataModule:
    """digits at ``size`` px: 60 fit, 20 val, ``n`` ID test images; OOD sets of ``n + 5``, ``n - 2`` and 2 images
    (3 ranks: one gets no batch of the last); 20 auxiliary outliers, a quarter held out."""
    noise = {"size": size, "channels": 1}
    settings: dict[str, Any] = dict(
        id_set=IDSetSpec("digits", classes=classes),
        ood_sets=[
            OODSetSpec("faces", "faces", "near", limit=n + 5),
            OODSetSpec("noise", "gaussian", "far", options={"n": n - 2, **noise}),
            OODSetSpec("few", "uniform", "far", options={"n": 2, **noise}),
        ],
        aux_set=AuxSetSpec("aux_photos", options={"n": 20, "crop_size": size}),
        aux_val_fraction=0.25,
        image_size=size,
        train_limit=60,
        val_limit=20,
        test_limit=n,
        batch_size=16,
    )
    return OODDataModule(**{**settings, **kwargs})


def classifier_file(root: Path, num_classes: int = 10) -> str:
    """A randomly initialised ``test_resnet`` classifier (1 channel) saved as a loadable checkpoint."""
    path = root / f"classifier{num_classes}.ckpt"
    if not path.is_file():  # written once (by the parent process of a DDP run)
        torch.manual_seed(0)
        save_method(Classifier(backbone="test_resnet", in_chans=1, num_classes=num_classes), path)
    return str(path)


def build(name: str, root: Path) -> OODMethod:
    """A seeded tiny ``name`` method (the same weights on every call and in every process)."""
    files = _files(name, root)  # first: writing them draws random numbers
    torch.manual_seed(0)
    if name == "classifier":
        return Classifier(backbone="test_resnet", in_chans=1, detectors=[KNN(k=2), Mahalanobis(), MSP()])
    if name == "oodformer":
        return OODformer(**TINY_VIT, detectors=[Mahalanobis(), MSP()])
    if name == "ssod":
        return SSOD(**TINY_SSOD, detectors=[KNN(k=2), Mahalanobis()])
    if name == "frozen_encoder":
        encoder = CheckpointEncoder(files[0], mean=[0.5], std=[0.5])
        return FrozenEncoder(encoder, in_chans=1, detectors=[KNN(k=2), Mahalanobis()], detector_cache=False)
    if name == "heatmap":
        return HeatmapOOD(files[0], in_chans=1, img_size=16, latent_dim=8, width=4,
                          detectors=[KNN(k=2), MSP()])  # fmt: skip
    if name == "diffguard":
        # grad_cam off: the mask's hard threshold turns last-bit differences between batch compositions (1 vs
        # 3 processes) into other masks, so rows would not be equal; the mask is tested in test_diffguard_presets
        return DiffGuard(*files, num_classes=3, in_chans=1, t_star=60, steps=2, grad_cam=False,
                         detectors=[Energy(), Mahalanobis()], combine_with="energy", combine_val_images=12)  # fmt: skip
    if name == "diffguard_adaptive":
        # The classifier-guided pixel setting with its per-image parts: the early stop (at a PSNR that stops the
        # tiny data's images at different levels of the 4-level inversion) and the seeded cut-outs of the guidance
        # input. A guidance scale of 100: at the preset's 3 the tiny model's regenerations stay so close to their
        # reference that the features score (about 7e-5) has near-ties of 6e-8, under the 2e-7 float32 noise of
        # another batch composition; at 100 the closest pair is 200x that noise apart. The data's normalisation
        # is given, so the method also runs outside a Trainer.
        return DiffGuard(*files, num_classes=3, in_chans=1, preset="cg_pixel_adaptive", steps=4, cutouts=3,
                         early_stop_psnr=22.0, classifier_scale=100.0, input_mean=[0.5], input_std=[0.5],
                         detectors=[Energy()], combine_with=None)  # fmt: skip
    raise ValueError(name)


def _files(name: str, root: Path) -> tuple[str, ...]:
    """The checkpoint files method ``name`` loads, written once (by the parent process of a DDP run)."""
    if name in ("frozen_encoder", "heatmap"):
        return (classifier_file(root),)
    if name in ("diffguard", "diffguard_adaptive"):
        from diffusion_helpers import tiny_checkpoints  # tests/diffusion_helpers.py

        files = (root / "classifier.ckpt", root / "diffusion.ckpt")
        return tuple(map(str, files)) if all(f.is_file() for f in files) else tiny_checkpoints(root)
    return ()


def write_files(root: Path) -> None:
    """Every checkpoint file the methods of :func:`build` load (before the processes of a DDP run start)."""
    for name in ("heatmap", "diffguard"):
        _files(name, root)


def data_for(name: str, **kwargs: Any) -> OODDataModule:
    """The tiny data a method of :func:`build` runs on (DiffGuard's tiny models: 3 classes at 8 px)."""
    return tiny_data(8, [0, 1, 2], n=10, **kwargs) if name.startswith("diffguard") else tiny_data(**kwargs)


def trainer(root: Path, world: int = 1, callbacks: list[Callback] | None = None) -> Trainer:
    """A quiet CPU trainer on ``world`` processes (DDP when more than one), results under ``root``."""
    evaluation = OODEvaluation(output_dir=str(root / "out"), plots=False, print_table=False)
    return Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(root), callbacks=[evaluation, *(callbacks or [])])  # fmt: skip


def rows(trainer: Trainer, model: OODMethod, data: OODDataModule) -> dict[tuple[str, str], dict]:
    """The result rows of ``trainer.test(model, datamodule=data)``, keyed by (score, set)."""
    trainer.test(model, datamodule=data, verbose=False)
    evaluation = next(cb for cb in trainer.callbacks if isinstance(cb, OODEvaluation))
    return {(r["detector"], r["set"]): r for r in evaluation.rows}


def perturbed(model: OODMethod, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The model's trained state with every float tensor shifted by a seeded random amount ("checkpoint B")."""
    generator = torch.Generator().manual_seed(1)
    return {
        k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }


def joined_by_env(rank: int, world: int, work: Callable[[], Any]) -> Any:
    """Run ``work()`` in a process of a :func:`ddp_helpers.run_ddp` group as one DDP rank of Lightning: the
    environment says the processes were launched from outside, so Lightning joins the existing group."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500")  # fmt: skip
    return work()
