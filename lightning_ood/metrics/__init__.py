"""Exact OOD metrics: pure functions in :mod:`.functional`, a torchmetrics shell in :mod:`.ood`."""

from lightning_ood.metrics.functional import METRIC_KEYS, ood_metrics, roc_curve
from lightning_ood.metrics.ood import OODMetrics

__all__ = ["METRIC_KEYS", "OODMetrics", "ood_metrics", "roc_curve"]
