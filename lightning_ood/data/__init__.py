"""OOD benchmark data: named sources (offline, torchvision, OpenOOD image lists), set specs and the
``OODDataModule``."""

from lightning_ood.data.datamodule import OODDataModule
from lightning_ood.data.datasets import SOURCES, AuxSetSpec, IDSetSpec, OODSetSpec, SplitSource
from lightning_ood.data.samplers import UnpaddedDistributedSampler

__all__ = [
    "SOURCES",
    "AuxSetSpec",
    "IDSetSpec",
    "OODDataModule",
    "OODSetSpec",
    "SplitSource",
    "UnpaddedDistributedSampler",
]
