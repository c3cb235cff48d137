"""Cross-cutting concerns: OOD metric aggregation, result files, plots, attention maps, SSOD masks, W&B tables."""

from lightning_ood.callbacks.attention_maps import AttentionMaps
from lightning_ood.callbacks.diffusion_samples import DiffusionSamples
from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.callbacks.regenerations import Regenerations
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.callbacks.ssod_masks import SSODMasks

__all__ = ["AttentionMaps", "DiffusionSamples", "OODEvaluation", "Regenerations", "SSODMasks", "run_dir"]
