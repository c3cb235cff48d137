"""Base of the callbacks that draw pictures of a few test images per test set when testing ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from lightning_ood.callbacks.run_dir import run_dir


class TestPictures(Callback):
    """Keeps the first ``num_images`` images of each chosen test set (rank 0, from the test batches: no extra
    data pass) and, when testing ends, has :meth:`draw` turn them into PNGs under ``plots/`` of the run directory
    (or ``output_dir``), logged to W&B as ``key`` images captioned by the file name after ``prefix``.

    Subclasses set ``key`` and ``prefix`` and implement :meth:`draw`.

    Args:
        num_images: images per test set.
        sets: names of the test sets to draw (``datamodule.test_set_names``); ``None``: all of them.
        output_dir: where to write (default: the run's log directory).
    """

    __test__ = False  # not a pytest test class
    key: ClassVar[str] = "test/pictures"
    prefix: ClassVar[str] = "pictures_"

    def __init__(
        self, num_images: int = 6, sets: list[str] | None = None, output_dir: str | None = None
    ) -> None:
        if num_images < 1:
            raise ValueError(f"{type(self).__name__} num_images must be >= 1, got {num_images}")
        self.num_images = num_images
        self.sets = sets
        self.output_dir = output_dir
        self.paths: list[Path] = []
        self._names: list[str] = []
        self._images: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        missing = [a for a in ("test_set_names", "mean", "std") if not hasattr(dm, a)]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__} needs a datamodule with {missing} (lightning_ood OODDataModule)"
            )
        self._names = list(dm.test_set_names)
        unknown = sorted(set(self.sets or []) - set(self._names))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} sets: {unknown} are not test sets; available: {self._names}"
            )
        self._images = {}
        self.paths = []

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.is_global_zero or (
            self.sets is not None and self._names[dataloader_idx] not in self.sets
        ):
            return
        kept = self._images.setdefault(dataloader_idx, [])
        room = self.num_images - sum(len(k[0]) for k in kept)
        if room > 0:
            images, targets = batch[0][:room], batch[1][:room]
            preds = getattr(outputs, "preds", None)
            preds = preds[:room] if preds is not None else torch.full_like(targets, -1)
            kept.append((images.detach().cpu(), targets.detach().cpu(), preds.detach().cpu()))

    def collected(self) -> list[tuple[str, Tensor, Tensor, Tensor]]:
        """``(set name, images [N, C, H, W], targets [N], predictions [N] or -1)`` per test set, in set order."""
        out = []
        for idx in sorted(self._images):
            images, targets, preds = (torch.cat(parts) for parts in zip(*self._images[idx], strict=True))
            out.append((self._names[idx], images, targets, preds))
        return out

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = Path(self.output_dir) if self.output_dir else run_dir(trainer)  # collective
        if not trainer.is_global_zero:
            return
        self.paths = self.draw(trainer, pl_module, directory / "plots")
        self._images = {}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and self.paths:
                logger.log_image(
                    key=self.key,
                    images=[str(p) for p in self.paths],
                    caption=[p.stem.removeprefix(self.prefix) for p in self.paths],
                )

    def draw(self, trainer: Trainer, pl_module: LightningModule, directory: Path) -> list[Path]:
        """Write the pictures into ``directory``; return their paths."""
        raise NotImplementedError


def denormalise(images: Tensor, datamodule: Any) -> Tensor:
    """Normalised ``[N, C, H, W]`` images -> pixels in ``[0, 1]`` with the datamodule's ``mean`` / ``std``."""
    mean = torch.tensor(datamodule.mean).view(1, -1, 1, 1)
    std = torch.tensor(datamodule.std).view(1, -1, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)
