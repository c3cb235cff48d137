"""Cross-cutting concerns: OOD metrics, result files, plots, attention maps, SSOD masks, detector search, W&B."""

from lightning_ood.callbacks.attention_maps import AttentionMaps
from lightning_ood.callbacks.detector_search import DetectorSearch
from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.callbacks.ssod_masks import SSODMasks

__all__ = ["AttentionMaps", "DetectorSearch", "OODEvaluation", "SSODMasks", "run_dir"]
