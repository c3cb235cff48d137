"""Cross-cutting concerns: OOD metric aggregation, result files, plots, W&B tables."""

from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.callbacks.run_dir import run_dir

__all__ = ["OODEvaluation", "run_dir"]
