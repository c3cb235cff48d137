"""Pictures of a heatmap decoder's output: where a test image is out of distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_ood.callbacks.plots import save_figure
from lightning_ood.callbacks.test_pictures import TestPictures, denormalise


@runtime_checkable
class HeatmapModel(Protocol):
    """A method that draws heatmaps (e.g. :class:`~lightning_ood.methods.HeatmapOOD`)."""

    def heatmaps(self, x: Tensor) -> Tensor:
        """Normalised ``[B, C, H, W]`` images -> ``[B, C, H, W]`` heatmaps in ``(-1, 1)``."""
        ...


class HeatmapPictures(TestPictures):
    """Saves, for the first images of each test set, three rows: the image; its heatmap (the channel-max ``|h|``,
    on the colour scale 0 to 1 of every picture, so that pictures of different sets compare); the heatmap over
    the image. Each column is titled with
    the image's ``heatmap`` score (mean of the channel-max ``|h|``; higher = more OOD) and predicted class.

    Drawn with the tested weights when testing ends, on rank 0, into ``plots/heatmaps_<set>.png`` in the run
    directory (or ``output_dir``) and, with a W&B logger, as ``test/heatmaps`` images. Costs one extra forward
    pass over ``num_images`` images per set.

    Args:
        num_images: images per test set.
        sets: names of the test sets to draw (``datamodule.test_set_names``); ``None``: all of them.
        alpha: opacity of the heatmap over the image, in ``[0, 1]``.
        output_dir: where to write (default: the run's log directory).
    """

    key = "test/heatmaps"
    prefix = "heatmaps_"

    def __init__(
        self,
        num_images: int = 6,
        sets: list[str] | None = None,
        alpha: float = 0.6,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(num_images, sets, output_dir)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"HeatmapPictures alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, HeatmapModel):  # fail before training, not after it
            raise TypeError(
                f"HeatmapPictures needs a method with heatmaps(x) (e.g. HeatmapOOD); {type(pl_module).__name__} "
                "has none. Remove the callback from trainer.callbacks."
            )

    def draw(self, trainer: Trainer, pl_module: LightningModule, directory: Path) -> list[Path]:
        return [
            save_figure(
                self._figure(name, pl_module, images, preds, trainer.datamodule),
                directory / f"heatmaps_{name}.png",
            )
            for name, images, _, preds in self.collected()
        ]

    def _figure(
        self, name: str, pl_module: LightningModule, images: Tensor, preds: Tensor, dm: Any
    ) -> plt.Figure:
        magnitude = (
            pl_module.heatmaps(images.to(pl_module.device)).float().abs().amax(dim=1).cpu()
        )  # [N, H, W]
        pixels = denormalise(images, dm).permute(0, 2, 3, 1).numpy()
        classes = list(getattr(dm, "class_names", None) or [])
        n = len(images)
        fig, axes = plt.subplots(3, n, figsize=(1.8 * n, 5.6), squeeze=False)
        for j in range(n):
            grey = pixels[j].shape[-1] == 1
            shown = pixels[j][..., 0] if grey else pixels[j]
            for row in (0, 2):
                axes[row, j].imshow(shown, cmap="gray" if grey else None, vmin=0, vmax=1)
            axes[1, j].imshow(magnitude[j].numpy(), cmap="inferno", vmin=0, vmax=1)
            axes[2, j].imshow(magnitude[j].numpy(), cmap="inferno", vmin=0, vmax=1, alpha=self.alpha)
            for row in range(3):
                axes[row, j].axis("off")
            pred = int(preds[j])
            label = classes[pred] if 0 <= pred < len(classes) else str(pred)
            axes[0, j].set_title(f"pred {label}", fontsize=7)
            axes[1, j].set_title(f"score {float(magnitude[j].mean()):.3f}", fontsize=7)
        axes[2, 0].set_title("overlay", fontsize=7, loc="left")
        fig.suptitle(f"Heatmaps - {name} (|h|, channel max, colours 0 to 1; bright = OOD)", fontsize=10)
        fig.tight_layout()
        return fig
