"""What an attack leaves behind: attacked images as a folder of PNGs (for reuse) and example grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from torch import Tensor


def to_uint8(pixels: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` pixels in [0, 1] -> ``[N, H, W, C]`` uint8 (rounded; C = 1 stays one channel)."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_image_folder(pixels: Tensor, folder: Path, info: dict[str, Any]) -> Path:
    """Write ``pixels`` as ``folder/00000.png``, ... (8-bit, so re-reading them quantises the attack to 1/255)
    and ``folder/attack.json`` (``info``: the attack's settings, targets and similarities); returns ``folder``.

    The folder can be used as an OOD set of its own: ``{name: x, source: imagefolder, options: {path: folder}}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_uint8(pixels)):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:05d}.png")
    (folder / "attack.json").write_text(json.dumps(info, indent=1))
    return folder


def attack_grid(name: str, clean: Tensor, delta: Tensor, cos_before: Tensor, cos_after: Tensor) -> plt.Figure:
    """Three rows for ``n`` images: clean | ``0.5 + 10 * delta`` | attacked (clean + delta), with each image's
    cosine similarity to its target before and after the attack."""
    n = len(clean)
    rows = {"clean": clean, "δ × 10": (0.5 + 10 * delta).clamp(0, 1), "attacked": (clean + delta).clamp(0, 1)}
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for j, image in enumerate(to_uint8(images)):
            grey = image.shape[-1] == 1
            axes[r, j].imshow(
                image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=255
            )
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    for j in range(n):
        axes[2, j].set_xlabel(f"cos {cos_before[j]:.2f}→{cos_after[j]:.2f}", fontsize=7)
    fig.suptitle(f"feature-matching attack - {name}", fontsize=10)
    fig.tight_layout()
    return fig
