"""Auxiliary outliers must not hold test images: a content check, image by image.

The config check of the DataModule (aux set and test sets never share a source, options and classes) cannot
see two sources or folders that hold the same pictures. :func:`check_aux_disjoint` compares their content, one
16-byte BLAKE2b digest per image, so the check is O(N) in the number of images (about 10 ms for 10,000 28x28
images held in memory):

- **both sets read from files** (``imagefolder``, ``imglist``): the digests are of the **file bytes**
  (:func:`~lightning_ood.data.file_digests.file_digests`): no file is decoded, each is read once, on one DDP
  rank (the files are split over the ranks and the digests all-gathered), and the digests are remembered on
  disk by path, size and modification time, so a later start only stats the files. A copy of a test file is
  caught whatever its name or folder; **a re-encoded copy of the same picture (other bytes: another format,
  quality or metadata) is not**.
- **either set held in memory** (Fashion-MNIST and the torchvision arrays, scikit-learn's digits, scikit-image
  crops, noise): the digests are of the uint8 ``[C, S, S]`` **pixels** after channel and size conversion, so
  a file that decodes to the pixels of an in-memory test image is caught whatever its format. The file side is
  then decoded (by a pool of threads, split over the ranks like the bytes, and remembered on disk under the
  conversion too).

Only the test sets (the ID test set and every OOD test set) are compared. An aux outlier equal to an ID
*train* image is label noise for a method that trains with outliers, but it leaks nothing into the evaluation,
which is what this check guards: a test image seen as an outlier in training inflates that set's metrics.
Under DDP the check is a collective: every rank runs it at the same point (the DataModule builds the aux set
on every rank).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from torch import Tensor

from lightning_ood.data.file_digests import DIGEST_SIZE, file_digests


class ImageSequence(Protocol):
    """Images decoded one at a time (e.g. :class:`~lightning_ood.data.datasets.LazyImages`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Tensor: ...


Images = Tensor | np.ndarray | ImageSequence


def array_digests(images: Tensor | np.ndarray) -> list[bytes]:
    """One 16-byte BLAKE2b digest of each uint8 image of ``[N, C, S, S]`` in-memory ``images`` (in order)."""
    rows = images.numpy() if isinstance(images, Tensor) else images
    return [_digest(row) for row in rows]


def _files(images: Images) -> Sequence[str | os.PathLike] | None:
    """The files the images are decoded from, one per image, or ``None`` for images held in memory."""
    return None if isinstance(images, Tensor | np.ndarray) else getattr(images, "files", None)


def image_digests(
    images: Images, workers: int | None = None, cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """uint8 ``[N, 16]``: a digest of each image's uint8 ``[C, S, S]`` pixels (after conversion), in order.

    Images decoded from files (:class:`~lightning_ood.data.datasets.LazyImages`,
    :class:`~lightning_ood.data.imglist.ResizedFiles`: ``files``) are decoded by ``workers`` threads per rank,
    split over the DDP ranks and remembered on disk under the file's path, size and modification time and the
    conversion (:func:`~lightning_ood.data.file_digests.file_digests`), so a changed file is decoded again and
    an unchanged one never is.
    """
    if isinstance(images, Tensor | np.ndarray):
        return _as_array(array_digests(images))
    files = _files(images)
    if files is None:  # decoded one at a time, each once
        return _as_array([_digest(images[i].numpy()) for i in range(len(images))])
    conversion = (
        type(images).__name__,
        *(getattr(images, k, None) for k in ("channels", "size", "resize_size")),
    )
    return file_digests(
        files,
        digest=lambda i: _digest(images[i].numpy()),
        kind="pixels/" + "/".join(map(str, conversion)),
        cache_dir=cache_dir,
        workers=workers,
        what="decoded images",
    )


def _as_array(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), DIGEST_SIZE).copy()


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=DIGEST_SIZE).digest()


def _keys(digests: np.ndarray) -> np.ndarray:
    """``[N]`` one 16-byte opaque value per digest row, for :func:`numpy.isin`."""
    return np.ascontiguousarray(digests).view(f"V{DIGEST_SIZE}").ravel()


def _shape(images: Images, what: str) -> tuple[int, ...]:
    """The per-image shape ``[C, S, S]``; fails unless the images are uint8."""
    first = images[0] if len(images) else None
    dtype = images.dtype if isinstance(images, Tensor | np.ndarray) else getattr(first, "dtype", None)
    if str(dtype) not in ("uint8", "torch.uint8"):
        raise ValueError(f"{what}: expected uint8 images, got {dtype}")
    return tuple(images.shape[1:]) if isinstance(images, Tensor | np.ndarray) else tuple(first.shape)


def _set_name(name: str) -> str:
    return "the ID test set" if name == "id" else f"OOD set {name!r}"


def check_aux_disjoint(
    aux_images: Images,
    test_sets: Mapping[str, Images],
    aux_name: str = "aux_set",
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """Fail when an auxiliary outlier equals an image of a test set: the same file bytes when both sets are
    read from files, else the same pixels after conversion (module docstring). A collective under DDP.

    Args:
        aux_images: the aux set's uint8 images ``[N, C, S, S]`` (a tensor, an array, or a sequence of
            ``[C, S, S]`` tensors decoded on access, with ``files`` when they come from files).
        test_sets: uint8 images of each test set by name, ``"id"`` for the ID test set; the same ``[C, S, S]``.
        aux_name: how the error names the aux set.
        cache_dir: where file digests are remembered (default
            :func:`~lightning_ood.data.file_digests.digest_cache_dir`).

    Raises:
        ValueError: naming every test set that shares images with the aux set, with the count of aux images
            equal to one of its images (an aux image present twice counts twice) and how they were compared;
            or when the images are not uint8 or not all of one shape.
        OSError: a file of a set cannot be read (on every rank).
    """
    if len(aux_images) == 0:
        return
    shape = _shape(aux_images, aux_name)
    memo: dict[tuple[int, str], np.ndarray] = {}

    def digests(images: Images, mode: str, what: str) -> np.ndarray:
        if (id(images), mode) not in memo:
            if mode == "bytes":
                memo[id(images), mode] = file_digests(_files(images), cache_dir=cache_dir, what=what)  # type: ignore[arg-type]
            else:
                memo[id(images), mode] = image_digests(images, cache_dir=cache_dir)
        return memo[id(images), mode]

    clashes = []
    for name, images in test_sets.items():
        if len(images) == 0:
            continue
        other = _shape(images, _set_name(name))
        if other != shape:
            raise ValueError(
                f"{_set_name(name)}: images of shape {list(other)}, but the aux images are {list(shape)}; "
                "the sets must be converted to the same channels and size before comparing"
            )
        both_files = _files(aux_images) is not None and _files(images) is not None
        mode = "bytes" if both_files else "pixels"
        aux = digests(aux_images, mode, f"{aux_name} files")
        count = int(np.isin(_keys(aux), _keys(digests(images, mode, f"{_set_name(name)} files"))).sum())
        if count:
            how = "file bytes" if both_files else f"pixels after conversion to {'x'.join(map(str, shape))}"
            clashes.append(f"{count} of the {len(aux)} aux images equal images of {_set_name(name)} ({how})")
    if clashes:
        raise ValueError(
            f"{aux_name}: auxiliary outliers must not hold test images, but {'; '.join(clashes)}. Use aux "
            "images from elsewhere (another source, folder or options), or remove those images from the aux "
            "folder."
        )
