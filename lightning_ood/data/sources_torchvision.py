"""Sources that come through torchvision (downloaded by ``prepare_data`` only) and local image folders.

- ``mnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision datasets under ``root``. ``setup``
  never downloads: a missing dataset fails with the folder it looked in and the advice to set
  ``download: true`` (which needs a network; ``prepare_data`` then downloads into ``root``).
- ``imagefolder``: any local folder (DTD/Textures, Places365, LSUN, iSUN, ImageNet-O, your own images). When
  the folder holds no images itself but has sub-folders, each sub-folder with images is a class (torchvision's
  ``ImageFolder`` layout); otherwise every image under it, recursively, is one unlabelled set. Images are
  decoded on access, so a folder of any size costs no memory up front.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lightning_ood.data.sources import RawSet

if TYPE_CHECKING:
    from torchvision.datasets import VisionDataset

#: source name -> (torchvision class name, the folder under root that the class reads, in a format string).
TORCHVISION_SETS: dict[str, tuple[str, str]] = {
    "mnist": ("MNIST", "MNIST/raw"),
    "kmnist": ("KMNIST", "KMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "svhn": ("SVHN", "{split}_32x32.mat"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _torchvision_dataset(name: str, split: str, root: str | None, download: bool) -> VisionDataset:
    import torchvision.datasets

    cls_name, where = TORCHVISION_SETS[name]
    if root is None:
        raise ValueError(f"source {name!r} needs data.root: the folder torchvision keeps {cls_name} in")
    cls = getattr(torchvision.datasets, cls_name)
    kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
    try:
        return cls(root, download=download, **kwargs)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        looked = Path(root) / where.format(split=split)
        raise FileNotFoundError(
            f"{name} ({split}) not found: torchvision looked in {looked}. Set `download: true` (needs a "
            f"network; prepare_data downloads into root={root}) or put the {cls_name} files there."
        ) from err


def torchvision_builder(name: str) -> tuple[Callable[..., RawSet], Callable[..., None]]:
    """``(build, prepare)`` of a torchvision source: ``build`` reads the disk, ``prepare`` downloads."""

    def build(split: str, root: str | None = None) -> RawSet:
        ds = _torchvision_dataset(name, split, root, download=False)
        images = np.asarray(ds.data)  # MNIST-like [N, H, W]; CIFAR [N, H, W, 3]; SVHN [N, 3, H, W]
        if images.ndim == 3:
            images = images[..., None]
        elif name == "svhn":
            images = images.transpose(0, 2, 3, 1)
        labels = np.asarray(ds.labels if name == "svhn" else ds.targets, dtype=np.int64)
        classes = tuple(getattr(ds, "classes", None) or (str(c) for c in range(10)))
        return RawSet(np.ascontiguousarray(images, dtype=np.uint8), labels, classes)

    def prepare(split: str, root: str | None = None, download: bool = False) -> None:
        if download:
            _torchvision_dataset(name, split, root, download=True)

    build.__doc__ = f"torchvision's {TORCHVISION_SETS[name][0]} split from root (never downloads)."
    return build, prepare


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def imagefolder(path: str, root: str | None = None) -> RawSet:
    """Every image under ``path`` (relative: under ``root``), decoded lazily; see the module docstring."""
    folder = Path(path) if Path(path).is_absolute() or root is None else Path(root) / path
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (imagefolder option path={path!r})")
    class_dirs = (
        [] if _image_files(folder, recursive=False) else sorted(d for d in folder.iterdir() if d.is_dir())
    )
    per_class = [_image_files(d, recursive=True) for d in class_dirs]
    classes = [(d.name, files) for d, files in zip(class_dirs, per_class, strict=True) if files]
    if classes:
        files = [f for _, fs in classes for f in fs]
        labels = np.concatenate([np.full(len(fs), c, dtype=np.int64) for c, (_, fs) in enumerate(classes)])
        return RawSet(files, labels, tuple(name for name, _ in classes))
    files = _image_files(folder, recursive=True)
    if not files:
        raise FileNotFoundError(
            f"image folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return RawSet(files, np.full(len(files), -1, dtype=np.int64))


def read_image(path: Path) -> np.ndarray:
    """Decode one image file to uint8 ``[H, W, C]`` with C = 1 (grey sources) or 3."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in {"1", "L", "I", "I;16", "F"} else "RGB")
            array = np.array(image)  # a writable copy
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return array[..., None] if array.ndim == 2 else array
