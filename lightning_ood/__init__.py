"""lightning-ood: out-of-distribution detection for image classification on PyTorch Lightning.

The main classes are importable from here (loaded on first use, so ``import lightning_ood`` stays light)::

    from lightning_ood import Classifier, OODDataModule, OODEvaluation, KNN
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: ``name -> module`` of everything exported at the top level.
_EXPORTS = {
    "OODMethod": "lightning_ood.methods",
    "Classifier": "lightning_ood.methods",
    "FrozenEncoder": "lightning_ood.methods",
    "OODDataModule": "lightning_ood.data",
    "OODEvaluation": "lightning_ood.callbacks",
    "Detector": "lightning_ood.detectors",
    "MSP": "lightning_ood.detectors",
    "Energy": "lightning_ood.detectors",
    "KNN": "lightning_ood.detectors",
    "Mahalanobis": "lightning_ood.detectors",
    "ViM": "lightning_ood.detectors",
    "OODMetrics": "lightning_ood.metrics",
    "ood_metrics": "lightning_ood.metrics",
    "threshold_at_id_recall": "lightning_ood.metrics.threshold",
    "OODCLI": "lightning_ood.cli",
    "train": "lightning_ood.cli",
    "evaluate": "lightning_ood.cli",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_ood' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
