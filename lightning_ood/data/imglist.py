"""The ``imglist`` source: OpenOOD v1.5's data layout, read from image lists.

An OpenOOD data root holds ``images_classic/`` (CIFAR, TIN, MNIST, SVHN, Textures, Places365),
``images_largescale/`` (ImageNet-1K, SSB-hard, NINCO, iNaturalist, OpenImage-O, ...) and
``benchmark_imglist/<benchmark>/<split>_<set>.txt``. Each line of a list is ``relative/path label``: the path is
relative to the list's image folder (``images``), the label an integer class index, or ``-1`` / absent for an
OOD set. One list is one set; the source's ``split`` is ``"all"``.

Cost at scale (ImageNet-1K's training list has 1.28M lines): building the set only parses the list (about a
second per million lines) and keeps the paths as strings; images are decoded on access, per batch, in the
DataLoader's workers. The expensive check that every listed file exists and is an image runs in
``prepare_data`` (once per node, before any rank builds a set) and a pass is remembered by the content hash of
the list and the image folder, so a second start skips it (:func:`check_imglist`,
:mod:`lightning_ood.data.file_checks`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TVF

from lightning_ood.data.file_checks import cache_file, checked_problems, load_problems
from lightning_ood.data.sources import RawSet
from lightning_ood.data.sources_torchvision import LISTED_UNREADABLE

#: How OpenOOD's scripts fetch the lists and images (named in every "not found" error).
GET_DATA = (
    "Get OpenOOD v1.5's data with their script: `python scripts/download/download.py --contents datasets "
    "--datasets ood_v1.5 --save_dir <root> --dataset_mode benchmark` in a clone of "
    "github.com/Jingkang50/OpenOOD (see docs/openood.md), then set data.init_args.root=<root>."
)
#: The checks :func:`check_imglist` can run, cheapest first.
CHECKS = ("off", "exists", "open", "decode")


def list_path(imglist: str, root: str | None) -> Path:
    """The list file: ``imglist`` as given when absolute or without ``root``, else under ``root``."""
    path = Path(imglist)
    return path if path.is_absolute() or root is None else Path(root) / path


def parse_imglist(path: Path) -> tuple[list[str], np.ndarray]:
    """``(relative paths, int64 labels [N])`` of a list file; a line without a label is ``-1``.

    Raises:
        FileNotFoundError: no such list (with how to get OpenOOD's data).
        ValueError: naming the file and line of a blank line, a path starting with ``/``, or a label that is
            not an integer >= -1.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist. {GET_DATA}")
    files: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens:
                raise ValueError(
                    f"{path}, line {number}: blank line; every line must be 'relative/path label'"
                )
            if tokens[0].startswith("/"):
                raise ValueError(f"{path}, line {number}: {tokens[0]!r} must be relative to the image folder")
            if len(tokens) > 2:
                raise ValueError(
                    f"{path}, line {number}: expected 'relative/path label', got {line.strip()!r}"
                )
            label = tokens[1] if len(tokens) == 2 else "-1"
            if not label.lstrip("-").isdigit() or int(label) < -1:
                raise ValueError(
                    f"{path}, line {number}: label {label!r} is not a class index (an integer >= 0) or -1 (OOD)"
                )
            files.append(tokens[0])
            labels.append(int(label))
    if not files:
        raise ValueError(f"image list {path} is empty")
    return files, np.asarray(labels, dtype=np.int64)


def image_folder(images: str, root: str | None) -> Path:
    """The folder the list's paths are relative to (``images``, under ``root`` when relative)."""
    folder = Path(images) if Path(images).is_absolute() or root is None else Path(root) / images
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist (imglist option images={images!r}). {GET_DATA}"
        )
    return folder


def imglist(
    imglist: str, images: str = "images_classic", root: str | None = None, check: str = "open"
) -> RawSet:
    """The images of one OpenOOD list, decoded on access; see the module docstring.

    Args:
        imglist: the list file, e.g. ``benchmark_imglist/cifar10/test_cifar10.txt`` (relative: under ``root``).
        images: the folder the list's paths are relative to (``images_classic`` or ``images_largescale``).
        root: the OpenOOD data root (the DataModule's ``root``).
        check: what ``prepare_data`` checks of every listed file (:func:`check_imglist`); not used here.

    Class names are ``"0"`` ... ``"K-1"`` for the largest label ``K-1`` (none when every label is ``-1``).
    """
    folder = image_folder(images, root)
    files, labels = parse_imglist(list_path(imglist, root))
    prefix = str(folder) + os.sep
    names = tuple(str(k) for k in range(int(labels.max()) + 1))
    return RawSet([prefix + f for f in files], labels, names)  # str paths: 1.28M Path objects cost ~0.3 GB


def _problem(path: str, check: str) -> str | None:
    """Why ``path`` fails ``check``, or ``None``."""
    if not os.path.isfile(path):
        return "no such file"
    if check == "exists":
        return None
    try:
        with Image.open(path) as image:
            if check == "decode":
                image.load()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (a 1.28M-line list is ~50 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_key(list_file: Path, folder: Path, check: str) -> str:
    """What decides a list's check: the list's content hash, the image folder and the check."""
    key = f"imglist\0{file_sha256(list_file)}\0{folder.resolve()}\0{check}"
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=20).hexdigest()


def check_imglist(
    imglist: str,
    images: str = "images_classic",
    root: str | None = None,
    check: str = "open",
    cache_dir: Path | None = None,
) -> bool:
    """Check every file of a list once; remember a pass by the list's content hash, folder and ``check``.

    ``check``: ``"exists"`` (a stat per file), ``"open"`` (PIL reads the header: an empty, missing or non-image
    file fails; the default), ``"decode"`` (every file fully decoded: also truncated files; hours for
    ImageNet-1K on few cores) or ``"off"``. Run by ``OODDataModule.prepare_data`` (once per node), in a pool
    of threads with a progress bar on rank 0; a pass is remembered in ``cache_dir`` (default
    ``$LIGHTNING_OOD_CACHE/file_checks``, :mod:`lightning_ood.data.file_checks`). A failure is not: the list's
    hash does not change when a file is fixed, so the next start checks again.

    Returns:
        ``True`` when the check ran, ``False`` when it was skipped (``off``, or passed before).

    Raises:
        OSError: naming the list, the line and the reason of the first failing files, with their count.
    """
    if check not in CHECKS:
        raise ValueError(f"imglist option check must be one of {list(CHECKS)}, got {check!r}")
    folder, path = image_folder(images, root), list_path(imglist, root)
    if check == "off":
        parse_imglist(path)  # the list's lines are still checked
        return False
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist. {GET_DATA}")
    key = _check_key(path, folder, check)
    if load_problems(cache_file(key, cache_dir), key, None) == []:  # passed before: the list is not parsed
        return False
    files, _ = parse_imglist(path)
    prefix = str(folder) + os.sep
    bad, _ = checked_problems(
        [prefix + f for f in files],
        lambda file: _problem(os.fspath(file), check),
        key,
        collective=False,
        remember_failures=False,
        cache_dir=cache_dir,
        what=f"image list {path.name}",
    )
    if bad:
        listed = "".join(f"\n  - line {n + 1}: {folder / files[n]}: {r}" for n, r in bad[:LISTED_UNREADABLE])
        more = f"\n  (and {len(bad) - LISTED_UNREADABLE} more)" if len(bad) > LISTED_UNREADABLE else ""
        raise OSError(
            f"image list {path}: {len(bad)} of {len(files)} files fail check={check!r}:{listed}{more}"
        )
    return True


class ResizedFiles:
    """Image files decoded on access with PIL and resized as torchvision's classic pipeline does.

    ``image i`` = ``CenterCrop(size)(Resize(resize_size, BILINEAR)(Image.open(f).convert(mode)))`` as uint8
    ``[C, size, size]`` (``mode`` RGB for 3 channels, L for 1): OpenOOD v1.5's test preprocessing (its
    ``TestStandardPreProcessor``) up to ``ToTensor`` + ``Normalize``, which the DataModule's collate does
    per batch with the same float32 operations.
    """

    def __init__(self, files: Sequence[str | Path], channels: int, size: int, resize_size: int) -> None:
        self.files, self.channels, self.size, self.resize_size = files, channels, size, resize_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        try:
            with Image.open(self.files[i]) as image:
                image = image.convert("RGB" if self.channels == 3 else "L")
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read image {self.files[i]}: {err}") from err
        image = TVF.center_crop(TVF.resize(image, self.resize_size, InterpolationMode.BILINEAR), self.size)
        array = np.array(image)
        array = array[..., None] if array.ndim == 2 else array
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
