"""Pictures of SSOD's self-sampled locations: which parts of an image it trains on as ID and as OOD."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_ood.callbacks.plots import save_figure
from lightning_ood.callbacks.test_pictures import TestPictures, denormalise

#: Overlay colours (RGB) of ID and OOD locations.
ID_COLOUR, OOD_COLOUR = (0.0, 0.8, 0.0), (0.9, 0.0, 0.0)


@runtime_checkable
class LocationMaskModel(Protocol):
    """A method that can show its ID / OOD locations (e.g. :class:`~lightning_ood.methods.SSOD`)."""

    def location_maps(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, C, H, W]`` images, ``[B]`` labels (``-1``: use the prediction) -> ``(id_mask, ood_mask, p_id)``,
        each ``[B, h, w]``."""
        ...


class SSODMasks(TestPictures):
    """Saves, for a few training images and the first images of each test set, SSOD's location masks.

    Each picture has three rows: the image; the image with its ID locations (green: the class's probability at
    the location is ``>= gamma``) and OOD locations (red: ``<= 1 - gamma``) overlaid, ignored ones left clear;
    and the OOD head's ID probability ``P_ID`` at each location (bright = ID). Training images are ID train
    images without augmentation, selected with their labels as in training; test images use their label, and
    OOD test images (no label) the predicted class. Drawn with the tested weights when testing ends, on rank 0,
    into ``plots/ssod_masks_<train|set>.png`` in the run directory (or ``output_dir``) and, with a W&B logger,
    as ``test/ssod_masks`` images. Costs one extra forward pass over ``num_images`` images per picture.

    Args:
        num_images: images per picture.
        sets: names of the test sets to draw (``datamodule.test_set_names``); ``None``: all of them.
        train: also draw training images.
        alpha: opacity of the mask colours over the image, in ``[0, 1]``.
        output_dir: where to write (default: the run's log directory).
    """

    key = "test/ssod_masks"
    prefix = "ssod_masks_"

    def __init__(
        self,
        num_images: int = 6,
        sets: list[str] | None = None,
        train: bool = True,
        alpha: float = 0.45,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(num_images, sets, output_dir)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SSODMasks alpha must be in [0, 1], got {alpha}")
        self.train = train
        self.alpha = alpha

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, LocationMaskModel):  # fail before training, not after it
            raise TypeError(
                f"SSODMasks needs a method with location_maps(x, labels) (e.g. SSOD); {type(pl_module).__name__} "
                "has none. Remove the callback from trainer.callbacks."
            )

    def draw(self, trainer: Trainer, pl_module: LightningModule, directory: Path) -> list[Path]:
        pictures = [("train", *self._train_images(trainer))] if self.train else []
        pictures += [(name, images, targets) for name, images, targets, _ in self.collected()]
        return [
            save_figure(
                self._figure(name, pl_module, images, labels, trainer.datamodule),
                directory / f"ssod_masks_{name}.png",
            )
            for name, images, labels in pictures
        ]

    def _train_images(self, trainer: Trainer) -> tuple[Tensor, Tensor]:
        """``num_images`` evenly spaced ID training images (not augmented) and their labels."""
        loader = trainer.datamodule.fit_dataloader()
        n = len(loader.dataset)
        picks = np.linspace(0, n - 1, min(self.num_images, n)).round().astype(int)
        images, labels = loader.collate_fn([loader.dataset[int(i)] for i in picks])
        return images, labels

    def _figure(
        self, name: str, pl_module: LightningModule, images: Tensor, labels: Tensor, dm: Any
    ) -> plt.Figure:
        """Three rows: the images, the ID / OOD masks over them, the per-location ``P_ID``."""
        id_mask, ood_mask, p_id = (
            t.cpu() for t in pl_module.location_maps(images.to(pl_module.device), labels.to(pl_module.device))
        )
        pixels = denormalise(images, dm).permute(0, 2, 3, 1).numpy()
        classes = list(getattr(dm, "class_names", None) or [])
        n = len(images)
        fig, axes = plt.subplots(3, n, figsize=(1.8 * n, 5.6), squeeze=False)
        size = pixels.shape[1:3]
        extent = (-0.5, size[1] - 0.5, size[0] - 0.5, -0.5)  # the location grid stretched over the image
        for j in range(n):
            grey = pixels[j].shape[-1] == 1
            shown = pixels[j][..., 0] if grey else pixels[j]
            for row in range(3):
                axes[row, j].imshow(shown, cmap="gray" if grey else None, vmin=0, vmax=1)
                axes[row, j].axis("off")
            overlay = _mask_rgba(id_mask[j], ood_mask[j], self.alpha)
            axes[1, j].imshow(overlay, extent=extent, interpolation="nearest")
            axes[2, j].imshow(p_id[j].numpy(), extent=extent, cmap="viridis", vmin=0, vmax=1, alpha=0.8)
            label = int(labels[j])
            title = "OOD" if label < 0 else (classes[label] if label < len(classes) else str(label))
            axes[0, j].set_title(title, fontsize=7)
            axes[1, j].set_title(f"ID {int(id_mask[j].sum())} / OOD {int(ood_mask[j].sum())}", fontsize=7)
        axes[2, 0].set_title("P_ID per location", fontsize=7, loc="left")
        fig.suptitle(f"SSOD locations - {name} (green: ID, red: OOD)", fontsize=10)
        fig.tight_layout()
        return fig


def _mask_rgba(id_mask: Tensor, ood_mask: Tensor, alpha: float) -> np.ndarray:
    """``[h, w, 4]`` colours: green ID, red OOD, transparent where ignored."""
    rgba = np.zeros((*id_mask.shape, 4), dtype=np.float32)
    rgba[id_mask.numpy()] = (*ID_COLOUR, alpha)
    rgba[ood_mask.numpy()] = (*OOD_COLOUR, alpha)
    return rgba
