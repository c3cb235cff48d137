"""Scoring a folder of images with a trained method: the DataModule's predict images and loader."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from lightning_ood.data.datasets import ImageDataset, folder_dataset


class FolderScoring:
    """A mixin of :class:`~lightning_ood.data.datamodule.OODDataModule` (``python -m lightning_ood.score``): it
    reads the data module's ``root``, ``_channels``, ``_image_size``, ``resize_size`` and ``_loaders``."""

    _predict: tuple[list[Path], ImageDataset] | None = None

    def set_predict_images(self, path: str | Path, skip_unreadable: bool = False) -> list[Path]:
        """Serve every image under ``path`` (recursively, sorted) from :meth:`predict_dataloader`, converted and
        normalised like the test sets; each batch's targets are the images' row indices into the returned list.
        ``skip_unreadable``: leave out files that cannot be decoded (with a warning) instead of failing."""
        self._predict = folder_dataset(
            path, self.root, self._channels, self._image_size, self.resize_size, skip_unreadable
        )
        return self._predict[0]

    @property
    def predict_paths(self) -> list[Path]:
        """The files :meth:`predict_dataloader` serves, in row-index order."""
        if self._predict is None:
            raise RuntimeError("call set_predict_images(path) first")
        return self._predict[0]

    def predict_dataloader(self) -> DataLoader:
        """The images given to :meth:`set_predict_images`, not augmented, each scored exactly once under DDP."""
        if self._predict is None:
            raise RuntimeError("call set_predict_images(path) before asking for the predict dataloader")
        return self._loaders.unpadded(self._predict[1], at_least_one_batch=True)
