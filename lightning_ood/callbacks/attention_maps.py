"""[CLS] attention-rollout overlays for a few ID and OOD test images (OODformer, Koner et al., BMVC 2021, Fig. 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_ood.callbacks.plots import save_figure
from lightning_ood.callbacks.test_pictures import TestPictures, denormalise
from lightning_ood.nets.vit import upsample_map


@runtime_checkable
class AttentionModel(Protocol):
    """A method that can show where its [CLS] token looks (e.g. :class:`~lightning_ood.methods.OODformer`)."""

    def cls_attention(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` images -> ``[B, grid_h, grid_w]`` [CLS] attention-rollout maps."""
        ...


class AttentionMaps(TestPictures):
    """Saves [CLS] attention-rollout overlays of the first ``num_images`` images of each test set.

    Images come from the first test batches that rank 0 sees (no extra data pass), are denormalised with the
    datamodule's ``mean``/``std`` and shown above the rollout heat map (red = more [CLS] attention) overlaid on
    them. Writes ``plots/attention_<set>.png`` into the run directory (or ``output_dir``) and, with a W&B logger,
    logs them as ``test/attention`` images. Work happens on rank 0 only; the maps cost one extra forward pass
    over ``num_images`` images per set.

    Args:
        num_images: images per test set.
        sets: names of the test sets to draw (``datamodule.test_set_names``); ``None``: all of them.
        alpha: opacity of the heat map over the image, in ``[0, 1]``.
        cmap: matplotlib colour map of the heat map.
        output_dir: where to write (default: the run's log directory).
    """

    key = "test/attention"
    prefix = "attention_"

    def __init__(
        self,
        num_images: int = 6,
        sets: list[str] | None = None,
        alpha: float = 0.5,
        cmap: str = "jet",
        output_dir: str | None = None,
    ) -> None:
        super().__init__(num_images, sets, output_dir)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"AttentionMaps alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.cmap = cmap

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Fail before training, not after it.
        if not isinstance(pl_module, AttentionModel):
            raise TypeError(
                f"AttentionMaps needs a method with cls_attention(x) (e.g. OODformer); {type(pl_module).__name__} "
                "has none. Remove the callback from trainer.callbacks."
            )

    def draw(self, trainer: Trainer, pl_module: LightningModule, directory: Path) -> list[Path]:
        classes = list(getattr(trainer.datamodule, "class_names", None) or [])
        paths = []
        for name, images, targets, preds in self.collected():
            with torch.no_grad():
                maps = pl_module.cls_attention(images.to(pl_module.device)).float().cpu()
            heat = upsample_map(maps, tuple(images.shape[-2:]))
            pixels = denormalise(images, trainer.datamodule)
            labels = [_caption(int(t), int(p), classes) for t, p in zip(targets, preds, strict=True)]
            paths.append(
                save_figure(self._figure(name, pixels, heat, labels), directory / f"attention_{name}.png")
            )
        return paths

    def _figure(self, name: str, pixels: Tensor, heat: Tensor, labels: list[str]) -> plt.Figure:
        """Two rows per set: the images, then the rollout heat map over them."""
        n = len(pixels)
        fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4.0), squeeze=False)
        for j in range(n):
            img = pixels[j].permute(1, 2, 0).numpy()
            grey = img.shape[-1] == 1
            shown = img[..., 0] if grey else img
            for row in (0, 1):
                axes[row, j].imshow(shown, cmap="gray" if grey else None, vmin=0, vmax=1)
                axes[row, j].axis("off")
            axes[1, j].imshow(heat[j].numpy(), cmap=self.cmap, alpha=self.alpha, vmin=0, vmax=1)
            axes[0, j].set_title(labels[j], fontsize=7)
        fig.suptitle(f"[CLS] attention rollout - {name}", fontsize=10)
        fig.tight_layout()
        return fig


def _caption(target: int, pred: int, classes: list[str]) -> str:
    def label(k: int) -> str:
        return classes[k] if 0 <= k < len(classes) else str(k)

    truth = "OOD" if target < 0 else label(target)
    return f"{truth} -> {label(pred)}" if pred >= 0 else truth
