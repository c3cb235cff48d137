"""Figures of a test run: ROC curves and ID-vs-OOD score histograms, one figure per detector."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from lightning_ood.metrics import roc_curve


def _finite(x: np.ndarray) -> np.ndarray:
    """Replace +-inf by the finite extremes so histograms can show them at the ends."""
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros_like(x)
    return np.clip(x, finite.min(), finite.max())


def plot_roc(
    detector: str, id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray], auroc: Mapping[str, float]
) -> plt.Figure:
    """One ROC curve (OOD positive) per OOD set, with its AUROC in the legend."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, scores in ood_scores.items():
        s = torch.as_tensor(np.concatenate([id_scores, scores]))
        y = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(scores))])
        fpr, tpr, _ = roc_curve(s, y)
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUROC {auroc[name]:.3f})", lw=1.5)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(
        xlabel="FPR (ID flagged as OOD)",
        ylabel="TPR (OOD flagged)",
        title=f"ROC - {detector}",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_histograms(detector: str, id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray]) -> plt.Figure:
    """ID vs each OOD set's score histogram (higher = more OOD), one panel per OOD set, shared bins."""
    n = len(ood_scores)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    clip = _finite(np.concatenate([id_scores, *ood_scores.values()]))
    lo, hi = float(clip.min()), float(clip.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
    id_clipped = clip[: len(id_scores)]
    offset = len(id_scores)
    for ax, (name, scores) in zip(axes.flat, ood_scores.items(), strict=False):
        ood_clipped = clip[offset : offset + len(scores)]
        offset += len(scores)
        ax.hist(id_clipped, bins=bins, density=True, alpha=0.55, label="ID", color="tab:blue")
        ax.hist(ood_clipped, bins=bins, density=True, alpha=0.55, label=name, color="tab:red")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score (higher = more OOD)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Score distributions - {detector}", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Save as PNG atomically and close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
