"""The pass over ID validation images that gives DiffGuard's combined score its standardisation statistics."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lightning_ood.data.samplers import UnpaddedDistributedSampler
from lightning_ood.derived_state import check_fresh, fingerprint, stamp
from lightning_ood.distributed import distributed_world
from lightning_ood.precision import full_precision


def validation_subset(datamodule: Any, limit: int) -> DataLoader:
    """The first ``limit`` images of the ID validation split (seeded), every image on exactly one rank."""
    loader = datamodule.val_dataloader() if datamodule is not None else []
    if not isinstance(loader, DataLoader):
        raise RuntimeError(
            "DiffGuard's combined score is standardised on ID validation images, but the data has no validation "
            "split: set data.init_args.val_fraction > 0, or model.init_args.combine_with: null"
        )
    dataset = Subset(loader.dataset, range(min(limit, len(loader.dataset))))
    rank, world = distributed_world()
    sampler = UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank) if world > 1 else None
    return DataLoader(
        dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn, num_workers=0
    )


def standardiser_fingerprint(method: Any) -> str:
    """What the standardisation statistics are computed from: the detectors' fit key (weights, fit data,
    settings), the combined detector's hyperparameters, and which ID validation images are streamed."""
    datamodule = method.trainer.datamodule
    limits = getattr(datamodule, "limits", {})
    det = method.detectors[method.hparams.combine_with]
    return fingerprint(fit=method.fit_key(), detector=det.fingerprint(), val_limit=limits.get("val"),
                       images=method.hparams.combine_val_images)  # fmt: skip


def fit_standardiser(method: Any) -> None:
    """Fit ``method.standardiser`` unless it was fitted from the same fingerprint
    (:func:`standardiser_fingerprint`; rank 0 decides): stream the ID validation subset through DiffGuard
    (classifier, diffusion round trip, the combined detector); never test images."""
    trainer = method._trainer
    current = None
    if trainer is not None:
        fresh, current = check_fresh(
            method._derived,
            "standardiser",
            lambda: standardiser_fingerprint(method),
            "DiffGuard standardisation",
        )
        if fresh and method.standardiser.fitted:
            return
    datamodule = trainer.datamodule if trainer is not None else None
    loader = validation_subset(datamodule, method.hparams.combine_val_images)
    standardiser = method.standardiser
    standardiser.reset()
    progress = trainer is None or trainer.is_global_zero
    bar = tqdm(loader, desc="DiffGuard: ID validation statistics", disable=not progress, leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)  # fmt: skip
    was_training = method.training
    method.eval()
    with torch.inference_mode(False), torch.no_grad():
        for batch in bar:
            if trainer is not None:
                batch = trainer.precision_plugin.convert_input(batch)
                images, _ = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
            else:
                images = batch[0].to(method.device)
            with full_precision(images.device):
                standardiser.update(method.combined_inputs(images))
    standardiser.finalize()
    method.train(was_training)
    stamp(method._derived, "standardiser", current)
