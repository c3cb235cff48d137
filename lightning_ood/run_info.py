"""What identifies a run in result files and experiment tracking: method, backbone, dataset, seed, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from lightning.pytorch import LightningModule, Trainer

#: The keys every result row and W&B run carries, so runs can be grouped and compared on them.
RUN_KEYS = ("method", "backbone", "dataset", "seed")
#: The distributions whose versions decide a run's numbers (recorded with every run).
VERSIONED = ("torch", "torchvision", "lightning", "timm", "numpy", "lightning-ood")


def run_summary(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """``{method, backbone, dataset, seed, ...}``: the method's ``run_config`` plus the data and the seed.

    The seed is the one ``seed_everything`` set (``PL_GLOBAL_SEED``), ``""`` when none was set.
    """
    summary = {key: "" for key in RUN_KEYS}
    summary.update(getattr(pl_module, "run_config", {}))
    summary["dataset"] = getattr(trainer.datamodule, "dataset_name", "") if trainer.datamodule else ""
    summary["seed"] = os.environ.get("PL_GLOBAL_SEED", "")
    return summary


def environment_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.5.1", ...}``: the versions that decide a run's numbers."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
