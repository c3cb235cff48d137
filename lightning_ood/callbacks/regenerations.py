"""Pictures of DiffGuard's regenerations: input | regenerated under the predicted class | unconditional reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_ood.callbacks.test_pictures import TestPictures


class Regenerations(TestPictures):
    """When testing ends, one PNG ``plots/regenerations.png``: a row per test set, for each of its first
    ``num_images`` images the input, its regeneration under the predicted class (titled with the class) and, when
    the method compares with one (``reference: unconditional``), the unconditional reference, side by side.

    Needs a method with ``regenerate(images, preds)`` (:class:`~lightning_ood.methods.DiffGuard`); the
    regenerations are recomputed for these few images only.
    """

    key: ClassVar[str] = "test/regenerations"
    prefix: ClassVar[str] = ""

    def draw(self, trainer: Trainer, pl_module: LightningModule, directory: Path) -> list[Path]:
        if not hasattr(pl_module, "regenerate"):
            raise TypeError(f"Regenerations needs a DiffGuard-like method, got {type(pl_module).__name__}")
        sets = self.collected()
        if not sets:
            return []
        names = getattr(trainer.datamodule, "class_names", None)
        columns = max(len(s[1]) for s in sets)
        fig, axes = plt.subplots(
            len(sets), columns, figsize=(1.9 * columns, 1.0 * len(sets) + 0.4), squeeze=False
        )
        for row, (set_name, images, _targets, preds) in enumerate(sets):
            strips, labels = self._strips(pl_module, images, preds)
            for col in range(columns):
                ax = axes[row][col]
                ax.axis("off")
                if col >= len(strips):
                    continue
                ax.imshow(strips[col], cmap="gray" if strips[col].ndim == 2 else None, vmin=0, vmax=1)
                label = int(labels[col])
                name = names[label] if names and label < len(names) else str(label)
                ax.set_title(f"{set_name}: {name}" if col == 0 else name, fontsize=7)
        title = "input | regenerated under the predicted class"
        if getattr(getattr(pl_module, "settings", None), "reference", "input") == "unconditional":
            title += " | unconditional reference"
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "regenerations.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return [path]

    @staticmethod
    def _strips(pl_module: Any, images: Tensor, preds: Tensor) -> tuple[list[Tensor], Tensor]:
        with torch.no_grad():
            regen = pl_module.regenerate(images.to(pl_module.device), preds.to(pl_module.device))
        parts = [regen.inputs, regen.regenerated] + ([regen.reference] if regen.reference is not None else [])
        gap = torch.ones_like(regen.inputs[..., :1])
        strips = []
        for i in range(len(images)):
            row = []
            for p in parts:
                row += [(p[i].float().cpu() + 1) / 2, gap[i].cpu()]
            strip = torch.cat(row[:-1], dim=-1).clamp(0, 1)
            strips.append(strip[0] if strip.shape[0] == 1 else strip.permute(1, 2, 0))
        return strips, regen.preds.cpu()
