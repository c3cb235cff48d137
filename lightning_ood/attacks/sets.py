"""Attacked OOD sets in the same evaluation as the clean ones (Adaloglou et al., TMLR 2024, Sec. 5)."""

from __future__ import annotations

import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_ood.attacks.feature_matching import AttackResult, FeatureMatchingAttack
from lightning_ood.attacks.report import attack_grid, save_image_folder
from lightning_ood.callbacks.plots import save_figure
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.data.datasets import ImageDataset, OODSetSpec, derived_rng, limit_indices
from lightning_ood.data.derived import TestSetBuilder
from lightning_ood.distributed import all_gather_cat, distributed_world, gathered_order

#: The paper's two variants: suffix -> smoothness weight lambda.
DEFAULT_VARIANTS = {"smooth": 5e3, "patchy": 0.0}


class AttackedSets(TestSetBuilder):
    """Feature-matching attacks (:class:`FeatureMatchingAttack`) on OOD test sets, scored as new OOD sets.

    For each OOD set ``s`` in ``sets`` a seeded subset of at most ``limit`` images is attacked, each towards a
    random ID training image (the *target*, drawn from the detectors' fit set, without replacement when it is
    large enough; the same targets for every variant), through the features of the method under test
    (``forward_outputs(x).features``: a frozen encoder, a classifier's penultimate features, ...). The sets
    ``s_clean`` (that subset, unattacked; with ``clean``) and ``s_<variant>`` for each variant join the
    evaluation in the group of ``s``, so every detector reports AUROC clean vs attacked. The targets are ID
    training images, hence in a k-NN bank fitted on ID train; :class:`~lightning_ood.attacks.KNNWithoutTargets`
    scores with them removed (the paper reports both).

    Work is split across DDP ranks and gathered; results do not depend on the number of ranks or the batch size.
    Writes ``plots/attack_<s>_<variant>.png`` grids (clean | delta x 10 | attacked) into the run directory and
    logs them to W&B (``test/attack``); with ``save_dir``, also ``<save_dir>/<s>_<variant>/*.png`` and
    ``attack.json`` (reusable as an ``imagefolder`` OOD set; PNGs quantise the attack to 8 bits).

    Cost: ``steps`` forward and backward passes per image and variant (the quickstart's resnet10t at 28 px on 2
    CPU cores: 2-5 minutes per 100 images and variant).

    Args:
        sets: names of OOD sets of the data config to attack.
        variants: ``{suffix: lambda}``; default ``{"smooth": 5e3, "patchy": 0.0}``.
        limit: attack a seeded random subset of at most this many images per set (``None``: all).
        steps, lr, init_std, batch_size: :class:`FeatureMatchingAttack` settings (the paper's defaults).
        seed: seeds the subsets, the targets and the initial perturbations.
        clean: also add each attacked subset unattacked, as ``<s>_clean``.
        save_dir: write the attacked images there as PNG folders (``None``: do not).
        grid_images: images per example grid (0: no grids).
    """

    def __init__(
        self,
        sets: list[str],
        variants: dict[str, float] | None = None,
        limit: int | None = None,
        steps: int = 250,
        lr: float = 1e-3,
        init_std: float = 1e-3,
        batch_size: int = 64,
        seed: int = 0,
        clean: bool = True,
        save_dir: str | None = None,
        grid_images: int = 8,
    ) -> None:
        self.variants = dict(DEFAULT_VARIANTS if variants is None else variants)
        if not sets or not self.variants or (limit is not None and limit < 1) or grid_images < 0:
            raise ValueError(
                f"AttackedSets: needs sets and variants, limit >= 1 or null, grid_images >= 0; got sets={sets}, "
                f"variants={self.variants}, limit={limit}, grid_images={grid_images}"
            )
        self.attacks = {
            suffix: FeatureMatchingAttack(steps, lr, init_std, smoothness, batch_size)
            for suffix, smoothness in self.variants.items()
        }
        self.sets, self.limit, self.seed, self.clean = list(sets), limit, seed, clean
        self.save_dir, self.grid_images = save_dir, grid_images
        self._targets: dict[str, np.ndarray] = {}

    def set_groups(self, ood_sets: list[OODSetSpec]) -> dict[str, str]:
        groups = {spec.name: spec.group for spec in ood_sets}
        unknown = [s for s in self.sets if s not in groups]
        if unknown:
            raise ValueError(
                f"AttackedSets.sets: {unknown} are not OOD sets of the data config ({list(groups)})"
            )
        suffixes = (["clean"] if self.clean else []) + list(self.variants)
        return {f"{s}_{suffix}": groups[s] for s in self.sets for suffix in suffixes}

    @property
    def fit_rows_used(self) -> np.ndarray:
        """Every target's index into the ID fit set (sorted, unique)."""
        rows = list(self._targets.values())
        return np.unique(np.concatenate(rows)) if rows else np.empty(0, dtype=np.int64)

    def build(self, datamodule: Any, model: Any) -> dict[str, ImageDataset]:
        if model is None or not hasattr(model, "forward_outputs"):
            raise RuntimeError("AttackedSets needs the method under test (run it through trainer.test)")
        trainer = datamodule.trainer
        directory = run_dir(trainer) if trainer is not None and self.grid_images else None  # collective
        out: dict[str, ImageDataset] = {}
        was_training = model.training
        model.eval()
        try:  # Lightning requests test loaders in inference mode; the attack needs autograd
            with torch.inference_mode(False):
                encode = _encoder(model, datamodule, trainer)
                for name in self.sets:
                    out.update(self._attack_set(name, datamodule, encode, model.device, directory, trainer))
        finally:
            model.train(was_training)
        return out

    def _attack_set(
        self,
        name: str,
        datamodule: Any,
        encode: Any,
        device: torch.device,
        directory: Path | None,
        trainer: Any,
    ) -> dict[str, ImageDataset]:
        source, fit = datamodule.test_dataset(name), datamodule.fit_dataset
        rows = limit_indices(np.arange(len(source)), self.limit, self.seed, f"attack/{name}")
        rng = derived_rng(self.seed, f"attack/{name}/targets")
        targets = rng.choice(len(fit), size=len(rows), replace=len(rows) > len(fit))
        self._targets[name] = targets
        raw = _stack(source, rows)
        clean, goal = _pixels(raw), _pixels(_stack(fit, targets))
        minus_one = torch.full((len(rows),), -1, dtype=torch.long)
        out = {f"{name}_clean": ImageDataset(raw, minus_one)} if self.clean else {}
        seed = zlib.crc32(f"{self.seed}/attack/{name}/noise".encode())
        for suffix, attack in self.attacks.items():
            noise = attack.initial_noise(tuple(clean.shape), seed)
            result = _sharded(attack, encode, clean, goal, noise, device)
            attacked = (clean + result.delta).clamp(0.0, 1.0)
            out[f"{name}_{suffix}"] = ImageDataset(attacked, minus_one)
            before, after = result.cos_before.mean().item(), result.cos_after.mean().item()
            rank_zero_info(f"attack {name}_{suffix}: mean cosine to the target {before:.3f} -> {after:.3f}")
            self._report(f"{name}_{suffix}", clean, result, targets, directory, trainer)
        return out

    def _report(
        self,
        name: str,
        clean: Tensor,
        result: AttackResult,
        targets: np.ndarray,
        directory: Path | None,
        trainer: Any,
    ) -> None:
        if trainer is not None and not trainer.is_global_zero:
            return
        if self.save_dir:
            info = {"fit_targets": targets.tolist(), "cos_before": result.cos_before.tolist(),
                    "cos_after": result.cos_after.tolist(), "variants": self.variants, "seed": self.seed}  # fmt: skip
            save_image_folder((clean + result.delta).clamp(0, 1), Path(self.save_dir) / name, info)
        if directory is None or not self.grid_images:
            return
        k = self.grid_images
        fig = attack_grid(name, clean[:k], result.delta[:k], result.cos_before[:k], result.cos_after[:k])
        path = save_figure(fig, directory / "plots" / f"attack_{name}.png")
        for logger in trainer.loggers if trainer is not None else []:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="test/attack", images=[str(path)], caption=[name])


def _stack(dataset: ImageDataset, rows: np.ndarray) -> Tensor:
    """``[n, C, S, S]`` images ``dataset[rows]`` as stored (uint8, or float in [0, 1])."""
    if len(rows) == 0:
        return torch.empty(0, *(dataset[0][0].shape if len(dataset) else (1, 1, 1)), dtype=torch.uint8)
    return torch.stack([dataset[int(i)][0] for i in rows])


def _pixels(images: Tensor) -> Tensor:
    """Float pixels in [0, 1] of uint8 or float images."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def _encoder(model: Any, datamodule: Any, trainer: Any) -> Any:
    """``pixels in [0, 1] -> features``: the data's normalisation, then the method's forward pass (in the
    trainer's precision context)."""
    mean = torch.tensor(datamodule.mean, device=model.device).view(1, -1, 1, 1)
    std = torch.tensor(datamodule.std, device=model.device).view(1, -1, 1, 1)

    def encode(pixels: Tensor) -> Tensor:
        context = trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()
        with context:
            features = model.forward_outputs((pixels - mean) / std).features
        if features is None:
            raise RuntimeError(f"{type(model).__name__}.forward_outputs gives no features to attack")
        return features

    return encode


def _sharded(
    attack: FeatureMatchingAttack,
    encode: Any,
    clean: Tensor,
    goal: Tensor,
    noise: Tensor,
    device: torch.device,
) -> AttackResult:
    """Attack this rank's share (positions ``rank::world``), gather every rank's, return them in set order."""
    rank, world = distributed_world()
    mine = slice(rank, None, world)
    part = attack(encode, clean[mine].to(device), goal[mine].to(device), noise[mine].to(device))
    order = torch.from_numpy(gathered_order(len(clean), world))
    out = []
    for tensor in part:
        gathered = all_gather_cat(tensor.contiguous()).cpu()
        arranged = torch.empty_like(gathered)
        arranged[order] = gathered
        out.append(arranged)
    return AttackResult(*out)
