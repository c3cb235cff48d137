"""Cross-cutting concerns: OOD metrics, result files, plots, pictures (attention, SSOD masks, heatmaps, diffusion
samples, regenerations), detector search, W&B tables."""

from lightning_ood.callbacks.attention_maps import AttentionMaps
from lightning_ood.callbacks.detector_search import DetectorSearch
from lightning_ood.callbacks.diffusion_samples import DiffusionSamples
from lightning_ood.callbacks.heatmap_pictures import HeatmapPictures
from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.callbacks.regenerations import Regenerations
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.callbacks.ssod_masks import SSODMasks

__all__ = [
    "AttentionMaps",
    "DetectorSearch",
    "DiffusionSamples",
    "HeatmapPictures",
    "OODEvaluation",
    "Regenerations",
    "SSODMasks",
    "run_dir",
]
