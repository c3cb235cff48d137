"""What identifies a run in result files and experiment tracking: method, backbone, dataset, seeds, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

#: The keys every result row and W&B run carries, so runs can be grouped and compared on them.
RUN_KEYS = ("method", "backbone", "dataset", "seed")
#: The distributions whose versions decide a run's numbers (recorded with every run).
VERSIONED = ("torch", "torchvision", "lightning", "timm", "numpy", "lightning-ood")
#: Checkpoint key holding the training seed (``seed_everything``) of the run that saved it.
SEED_KEY = "lightning_ood_seed"


def global_seed() -> int | None:
    """The seed ``seed_everything`` set in this process (``PL_GLOBAL_SEED``), ``None`` when none was set."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed not in (None, "") else None


class RunFacts(Callback):
    """Writes the training seed into every checkpoint and remembers the seed of the checkpoint under test.

    So an ``evaluate.py`` run of a checkpoint reports the seed the checkpoint was *trained* with, not the
    evaluation's own ``seed_everything``. The CLI sets :attr:`checkpoint_seed` when it inspects ``--ckpt_path``.
    """

    def __init__(self) -> None:
        self.checkpoint_seed: int | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        seed = global_seed()
        if seed is not None:
            checkpoint[SEED_KEY] = seed


def training_seed(trainer: Trainer) -> int | None:
    """The seed the evaluated weights were trained with: the tested checkpoint's record (:class:`RunFacts`),
    else this process's ``seed_everything`` seed."""
    if trainer.ckpt_path:
        for cb in trainer.callbacks:
            if isinstance(cb, RunFacts) and cb.checkpoint_seed is not None:
                return cb.checkpoint_seed
    return global_seed()


def detector_settings(pl_module: LightningModule) -> dict[str, str]:
    """``{score name: "KNN(k=50, ...)"}``: each configured detector's class and hyperparameters (its
    ``extra_repr``), the identity ``compare`` tells detectors of the same name apart by."""
    detectors = getattr(pl_module, "detectors", None) or {}
    return {name: f"{type(det).__name__}({det.extra_repr()})" for name, det in detectors.items()}


def run_summary(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """The run's facts: ``method``, ``backbone`` (the method's ``run_config``, plus any other keys it adds),
    ``dataset``, ``seed`` (the training seed, an ``int`` or ``None``), ``data_seed`` (the data split seed),
    ``ckpt_path`` (the tested checkpoint, absolute, or ``None``) and ``detectors``
    (:func:`detector_settings`)."""
    summary: dict[str, Any] = {key: "" for key in RUN_KEYS}
    summary.update(getattr(pl_module, "run_config", {}))
    dm = trainer.datamodule
    summary["dataset"] = getattr(dm, "dataset_name", "") if dm else ""
    summary["seed"] = training_seed(trainer)
    summary["data_seed"] = getattr(dm, "seed", None) if dm else None
    summary["ckpt_path"] = str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else None
    summary["detectors"] = detector_settings(pl_module)
    return summary


def run_name(summary: dict[str, Any]) -> str:
    """A readable run name, ``<method>-<backbone>-<dataset>-s<seed>`` (e.g. ``classifier-resnet18-cifar10-s0``)."""
    parts = [str(summary.get(k) or "") for k in ("method", "backbone", "dataset")]
    seed = summary.get("seed")
    name = "-".join(p.replace("/", "_") for p in parts if p)
    return f"{name}-s{seed}" if seed is not None else name


def environment_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.5.1", ...}``: the versions that decide a run's numbers."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
