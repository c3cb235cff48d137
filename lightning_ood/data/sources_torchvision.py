"""Sources that come through torchvision (downloaded by ``prepare_data`` only) and local image folders.

- ``mnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision datasets under ``root``. ``setup``
  never downloads: a missing dataset fails with the folder it looked in and the advice to set
  ``download: true`` (which needs a network; ``prepare_data`` then downloads into ``root``).
- ``imagefolder``: any local folder (DTD/Textures, Places365, LSUN, iSUN, ImageNet-O, your own images). When
  the folder holds no images itself but has sub-folders, each sub-folder with images is a class (torchvision's
  ``ImageFolder`` layout); otherwise every image under it, recursively, is one unlabelled set. Images are
  decoded on access, so a folder of any size costs no memory up front. Every file must decode
  (:func:`unreadable_reason`), so that an unreadable one (empty, truncated, not an image) fails when the set
  is built, listed with the others, and not midway through an evaluation; with the option
  ``skip_unreadable: true`` they are left out with a warning giving their count, and the set holds only the
  readable images.

  Cost at scale: building the set lists the folder (a stat per file, about 10-15 us each on a local disk) on
  every rank. The decode check runs once per node in ``prepare_data`` (:func:`check_imagefolder`) and is
  remembered by the listing (paths, sizes, modification times: :mod:`lightning_ood.data.file_checks`), so
  ``setup`` and every later start only read that result. Without it (no ``Trainer``, a cache that could not
  be written), ``setup`` checks the files itself, each DDP rank its share.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, UnidentifiedImageError

from lightning_ood.data.file_checks import Problems, checked_problems, listing_key
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


#: What an image folder's check is, in its cache key: a PIL upgrade may read other files.
_CHECK = f"imagefolder: read_image decodes (PIL {PIL.__version__})"


def _image_files(folder: Path, recursive: bool) -> list[tuple[Path, os.stat_result]]:
    """The image files under ``folder``, sorted, each with its ``stat`` (the one ``Path.is_file`` would take)."""
    listed = []
    for path in folder.rglob("*") if recursive else folder.iterdir():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                status = path.stat()
            except (OSError, ValueError):  # as Path.is_file: a broken link or an unreadable entry is no file
                continue
            if stat.S_ISREG(status.st_mode):
                listed.append((path, status))
    return sorted(listed, key=lambda entry: entry[0])


@dataclass(frozen=True)
class _Listing:
    """An image folder as listed: every image file (``raw``, none checked yet) and the key of the listing."""

    folder: Path
    raw: RawSet
    key: str


def _list_folder(path: str, root: str | None) -> _Listing:
    """List the folder ``path`` (relative: under ``root``): no file is opened."""
    folder = Path(path) if Path(path).is_absolute() or root is None else Path(root) / path
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (imagefolder option path={path!r})")
    class_dirs = (
        [] if _image_files(folder, recursive=False) else sorted(d for d in folder.iterdir() if d.is_dir())
    )
    per_class = [_image_files(d, recursive=True) for d in class_dirs]
    classes = [(d.name, listed) for d, listed in zip(class_dirs, per_class, strict=True) if listed]
    if classes:
        entries = [entry for _, listed in classes for entry in listed]
        labels = np.concatenate([np.full(len(ls), c, dtype=np.int64) for c, (_, ls) in enumerate(classes)])
        names = tuple(name for name, _ in classes)
    else:
        entries = _image_files(folder, recursive=True)
        if not entries:
            raise FileNotFoundError(
                f"image folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        labels, names = np.full(len(entries), -1, dtype=np.int64), ()
    files = [f for f, _ in entries]
    size = np.array([s.st_size for _, s in entries], dtype=np.int64)
    mtime = np.array([s.st_mtime_ns for _, s in entries], dtype=np.int64)
    key = listing_key(_CHECK, [str(f) for f in files], size, mtime)
    return _Listing(folder, RawSet(files, labels, names), key)


def imagefolder(path: str, root: str | None = None, skip_unreadable: bool = False) -> RawSet:
    """Every readable image under ``path`` (relative: under ``root``); see the module docstring.

    Lists the folder; the decode check is the one remembered for this listing (by ``prepare_data``,
    :func:`check_imagefolder`, or an earlier start), else it runs here, split over the DDP ranks (every rank
    builds its sets at the same point of ``setup``).

    Raises:
        OSError: listing the files that cannot be decoded (unless ``skip_unreadable``).
    """
    listing, problems, _ = _checked_listing(path, root, collective=True)
    return _readable(listing.folder, listing.raw, skip_unreadable, problems)


def check_imagefolder(path: str, root: str | None = None, skip_unreadable: bool = False) -> bool:
    """Decode every file of the folder once and remember which fail, by the folder's listing (paths, sizes,
    modification times); run by ``OODDataModule.prepare_data`` (local rank 0 of each node, no collective).
    A later :func:`imagefolder` of the same listing opens no file. Nothing is raised for unreadable files here:
    every rank's ``setup`` fails (or, with ``skip_unreadable``, warns) alike, from the remembered result.

    Returns:
        ``True`` when the files were checked, ``False`` when the result was remembered from before.
    """
    return _checked_listing(path, root, collective=False)[2]


def _checked_listing(path: str, root: str | None, *, collective: bool) -> tuple[_Listing, Problems, bool]:
    """The folder's listing, its unreadable files (remembered or checked now) and whether they were checked
    now; ``collective``: split the check over the DDP ranks (every rank must call it)."""
    listing = _list_folder(path, root)
    problems, checked = checked_problems(
        listing.raw.images,
        unreadable_reason,
        listing.key,
        collective=collective,
        what=f"image folder {listing.folder}",
    )
    return listing, problems, checked


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why :func:`read_image` cannot decode ``path``, or ``None`` when it can."""
    try:
        read_image(Path(path))
    except OSError as err:
        cause = err.__cause__ or err
        return (
            "not an image file PIL can identify" if isinstance(cause, UnidentifiedImageError) else str(cause)
        )
    return None


def _readable(folder: Path, raw: RawSet, skip: bool, problems: Problems) -> RawSet:
    """``raw`` without the files of ``problems`` when ``skip`` (with a warning); else fail listing them."""
    files: list[Path] = raw.images  # type: ignore[assignment]
    if not problems:
        return raw
    bad = [(files[row], reason) for row, reason in problems]
    listed = "".join(f"\n  - {f}: {r}" for f, r in bad[:LISTED_UNREADABLE])
    more = f"\n  (and {len(bad) - LISTED_UNREADABLE} more)" if len(bad) > LISTED_UNREADABLE else ""
    if not skip:
        raise OSError(
            f"image folder {folder}: {len(bad)} of {len(files)} image files cannot be read:{listed}{more}\n"
            "Fix or remove them, or set `skip_unreadable: true` in this set's options to leave them out."
        )
    keep = np.ones(len(files), dtype=bool)
    keep[[row for row, _ in problems]] = False
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
