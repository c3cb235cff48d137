"""Sources that come through torchvision (downloaded by ``prepare_data`` only) and local image folders.

- ``mnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision datasets under ``root``. ``setup``
  never downloads: a missing dataset fails with the folder it looked in and the advice to set
  ``download: true`` (which needs a network; ``prepare_data`` then downloads into ``root``).
- ``imagefolder``: any local folder (DTD/Textures, Places365, LSUN, iSUN, ImageNet-O, your own images). When
  the folder holds no images itself but has sub-folders, each sub-folder with images is a class (torchvision's
  ``ImageFolder`` layout); otherwise every image under it, recursively, is one unlabelled set. Images are
  decoded on access, so a folder of any size costs no memory up front. Every file is decoded once when the
  set is built, so that an unreadable one (empty, truncated, not an image) fails then, listed with the
  others, and not midway through an evaluation; with the option ``skip_unreadable: true`` they are left out
  with a warning giving their count, and the set holds only the readable images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, UnidentifiedImageError

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
#: How many unreadable files an error or warning lists by path (the count is always given).
LISTED_UNREADABLE = 5


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


def imagefolder(path: str, root: str | None = None, skip_unreadable: bool = False) -> RawSet:
    """Every readable image under ``path`` (relative: under ``root``); see the module docstring.

    Raises:
        OSError: listing the files that cannot be decoded (unless ``skip_unreadable``).
    """
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
        return _readable(folder, RawSet(files, labels, tuple(name for name, _ in classes)), skip_unreadable)
    files = _image_files(folder, recursive=True)
    if not files:
        raise FileNotFoundError(
            f"image folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return _readable(folder, RawSet(files, np.full(len(files), -1, dtype=np.int64)), skip_unreadable)


def unreadable_reason(path: Path) -> str | None:
    """Why :func:`read_image` cannot decode ``path``, or ``None`` when it can."""
    try:
        read_image(path)
    except OSError as err:
        cause = err.__cause__ or err
        return (
            "not an image file PIL can identify" if isinstance(cause, UnidentifiedImageError) else str(cause)
        )
    return None


def _readable(folder: Path, raw: RawSet, skip: bool) -> RawSet:
    """``raw`` without its unreadable files when ``skip`` (with a warning); else fail listing them."""
    files: list[Path] = raw.images  # type: ignore[assignment]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        reasons = list(pool.map(unreadable_reason, files))
    bad = [(f, r) for f, r in zip(files, reasons, strict=True) if r is not None]
    if not bad:
        return raw
    listed = "".join(f"\n  - {f}: {r}" for f, r in bad[:LISTED_UNREADABLE])
    more = f"\n  (and {len(bad) - LISTED_UNREADABLE} more)" if len(bad) > LISTED_UNREADABLE else ""
    if not skip:
        raise OSError(
            f"image folder {folder}: {len(bad)} of {len(files)} image files cannot be read:{listed}{more}\n"
            "Fix or remove them, or set `skip_unreadable: true` in this set's options to leave them out."
        )
    keep = np.array([r is None for r in reasons])
    if not keep.any():
        raise OSError(
            f"image folder {folder}: none of its {len(files)} image files can be read:{listed}{more}"
        )
    labels = raw.labels[keep]
    empty = [name for c, name in enumerate(raw.class_names) if not (labels == c).any()]
    rank_zero_warn(
        f"image folder {folder}: left out {len(bad)} of {len(files)} image files that cannot be read "
        f"(skip_unreadable: true){f'; classes left without images: {empty}' if empty else ''}:{listed}{more}"
    )
    return RawSet([f for f, k in zip(files, keep, strict=True) if k], labels, raw.class_names)


def read_image(path: Path) -> np.ndarray:
    """Decode one image file to uint8 ``[H, W, C]`` with C = 1 (grey sources) or 3."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in {"1", "L", "I", "I;16", "F"} else "RGB")
            array = np.array(image)  # a writable copy
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return array[..., None] if array.ndim == 2 else array
