"""The table of image sources by name, the set specifications the DataModule takes, and seeded subsets.

A source with native train/test splits (``fashionmnist``, the torchvision sets) serves them as they are. Any
other source is one pool of images: ``split="all"`` is the whole pool, and ``"train"``/``"test"`` are a fixed
80/20 split of it (seed 0, whatever the run's seed) so that such a source can also be an ID set. An OOD set's
default split is ``"test"`` for sources with native splits and ``"all"`` otherwise.
"""

from __future__ import annotations

import inspect
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ood.contract import MEAN_GROUPS, OOD_GROUPS
from lightning_ood.data import sources as off
from lightning_ood.data.sources import RawSet
from lightning_ood.data.sources_torchvision import imagefolder, read_image, torchvision_builder
from lightning_ood.data.transforms import format_images

GROUPS = OOD_GROUPS
#: Names no OOD set may take: the ID set's, and the group means' in logged keys ``test/<near|far|all>/...``.
RESERVED_NAMES = ("id", *MEAN_GROUPS)
SPLITS = ("train", "test", "all")
_POOL_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Source:
    """How to build one named source.

    Attributes:
        build: ``build(**options)`` -> :class:`RawSet`; also gets ``split=`` when ``splits`` and ``root=``
            when ``uses_root``.
        num_classes: known class count; ``0`` for an unlabelled source, ``None`` when only the data can tell.
        channels, size: native image channels and side, when fixed (the DataModule's defaults for an ID set).
        splits: whether the source has native train/test splits.
        uses_root: whether ``build`` reads from the DataModule's ``root``.
        prepare: ``prepare(split, root, download)``, run by ``prepare_data`` (the only place that downloads).
    """

    build: Callable[..., RawSet]
    num_classes: int | None
    channels: int | None = None
    size: int | None = None
    splits: bool = False
    uses_root: bool = False
    prepare: Callable[..., None] | None = None


def _torchvision_source(name: str, num_classes: int, channels: int, size: int) -> Source:
    build, prepare = torchvision_builder(name)
    return Source(build, num_classes, channels, size, splits=True, uses_root=True, prepare=prepare)


SOURCES: dict[str, Source] = {
    "fashionmnist": Source(
        off.fashion_mnist, 10, 1, 28, splits=True, uses_root=True, prepare=off.prepare_fashion_mnist
    ),
    "digits": Source(off.digits, 10, 1, 8),
    "faces": Source(off.faces, 0, 1, 25),
    "textures": Source(off.textures, len(off.TEXTURE_IMAGES), 1),
    "photos": Source(off.photos, len(off.PHOTO_IMAGES), 3),
    "aux_photos": Source(off.aux_photos, len(off.AUX_IMAGES), 3),
    "gaussian": Source(off.gaussian, 0),
    "uniform": Source(off.uniform, 0),
    "mnist": _torchvision_source("mnist", 10, 1, 28),
    "kmnist": _torchvision_source("kmnist", 10, 1, 28),
    "cifar10": _torchvision_source("cifar10", 10, 3, 32),
    "cifar100": _torchvision_source("cifar100", 100, 3, 32),
    "svhn": _torchvision_source("svhn", 10, 3, 32),
    "imagefolder": Source(imagefolder, None, uses_root=True),
}


def get_source(name: str, where: str) -> Source:
    """The source called ``name``; ``where`` names the config entry in the error for an unknown name."""
    if name not in SOURCES:
        raise ValueError(f"{where}: unknown source {name!r}; available: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def check_options(source: str, options: dict[str, Any], where: str) -> None:
    """Fail, naming ``where`` and the key, when ``options`` are not keyword arguments of the builder."""
    params = inspect.signature(SOURCES[source].build).parameters
    allowed = [p for p in params if p not in ("split", "root")]
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"{where}.options: {source!r} has no option {key!r}; it takes {allowed or 'none'}"
            )


def resolve_split(source: str, split: str | None, where: str) -> str:
    """The split to read (see module doc); fails naming ``where`` for a split the source does not have."""
    native = SOURCES[source].splits
    split = split or ("test" if native else "all")
    if split not in SPLITS or (native and split == "all"):
        allowed = SPLITS[:2] if native else SPLITS
        raise ValueError(f"{where}.split: {source!r} has splits {list(allowed)}, got {split!r}")
    return split


@dataclass
class IDSetSpec:
    """The in-distribution set.

    Attributes:
        source: a name in :data:`SOURCES`.
        classes: original class indices to keep, relabelled ``0..len(classes)-1`` in this order (``None``:
            all).
        num_classes: required only when the source cannot know its class count without reading the data
            (``imagefolder``); checked against the data at ``setup``.
        options: keyword arguments of the source's builder (e.g. ``{"path": ...}`` for ``imagefolder``).
    """

    source: str = "fashionmnist"
    classes: list[int] | None = None
    num_classes: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = get_source(self.source, "id_set.source").num_classes
        check_options(self.source, self.options, "id_set")
        if known == 0:
            raise ValueError(f"id_set.source: {self.source!r} is unlabelled and cannot be the ID set")
        if known is not None and self.num_classes not in (None, known):
            raise ValueError(f"id_set.num_classes={self.num_classes} but {self.source!r} has {known} classes")
        total = known if known is not None else self.num_classes
        if total is None:
            raise ValueError(
                f"id_set.num_classes is required for source {self.source!r}: its class count is not known "
                "without reading the data"
            )
        classes = self.classes
        if classes is not None and (
            not classes or len(set(classes)) != len(classes) or not all(0 <= c < total for c in classes)
        ):
            raise ValueError(f"id_set.classes: must be distinct class indices in [0, {total}), got {classes}")

    @property
    def class_count(self) -> int:
        """Number of ID classes after the class subset, known without I/O."""
        if self.classes is not None:
            return len(self.classes)
        return SOURCES[self.source].num_classes or self.num_classes  # type: ignore[return-value]


@dataclass
class OODSetSpec:
    """One named test OOD set; every sample's target is ``-1``.

    Errors name the set and the key, e.g. ``OOD set 'x'.group: must be one of ['near', 'far'], got 'mid'``.

    Attributes:
        name: the set's name in ``test_set_names`` and in logged keys; unique, not in :data:`RESERVED_NAMES`.
        source: a name in :data:`SOURCES`.
        group: ``"near"`` or ``"far"`` (default ``"far"``: most sets of a benchmark are far).
        classes: original class indices to keep (e.g. the held-out classes of an open-set split).
        split: ``"train"``, ``"test"`` or ``"all"``; ``None``: ``"test"`` if the source has native splits,
            else ``"all"``.
        limit: keep a seeded random subset of at most this many images.
        options: keyword arguments of the source's builder.
    """

    name: str
    source: str
    group: str = "far"
    classes: list[int] | None = None
    split: str | None = None
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"OOD set {self.name!r}"
        if self.name in RESERVED_NAMES or not self.name or "/" in self.name:
            raise ValueError(
                f"{where}.name: must be non-empty, without '/' and not one of {list(RESERVED_NAMES)}, "
                f"got {self.name!r}"
            )
        if self.group not in GROUPS:
            raise ValueError(f"{where}.group: must be one of {list(GROUPS)}, got {self.group!r}")
        _check_set(self, where)


@dataclass
class AuxSetSpec:
    """Auxiliary outliers for methods that train with them; never the source and classes of a test set.

    Attributes: as :class:`OODSetSpec` (targets are ``-1``).
    """

    source: str = "aux_photos"
    classes: list[int] | None = None
    split: str | None = None
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_set(self, "aux_set")


def _check_set(spec: OODSetSpec | AuxSetSpec, where: str) -> None:
    """What an OOD or aux spec can check without I/O: source, options, split, limit, class range."""
    known = get_source(spec.source, f"{where}.source").num_classes
    check_options(spec.source, spec.options, where)
    resolve_split(spec.source, spec.split, where)
    if spec.limit is not None and spec.limit < 1:
        raise ValueError(f"{where}.limit: must be a positive integer or null, got {spec.limit}")
    if spec.classes is not None and known is not None and not all(0 <= c < known for c in spec.classes):
        raise ValueError(f"{where}.classes: {spec.source!r} has {known} classes, got {spec.classes}")


def derived_rng(seed: int, key: str) -> np.random.Generator:
    """An independent generator per ``(seed, key)``, stable across processes and Python runs."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def limit_indices(indices: np.ndarray, limit: int | None, seed: int, key: str) -> np.ndarray:
    """A seeded random subset of at most ``limit`` of ``indices`` (all of them when ``limit`` is ``None``),
    in ascending order."""
    if limit is None or limit >= len(indices):
        return indices
    return np.sort(derived_rng(seed, key).choice(indices, size=limit, replace=False))


def load_split(
    source: str, split: str, options: dict[str, Any], root: str | None, cache: dict[str, RawSet]
) -> tuple[RawSet, np.ndarray]:
    """``(raw, indices)``: a source's data and the indices of ``split`` in it. ``cache`` shares loads."""
    src = SOURCES[source]
    kwargs = dict(options, **({"root": root} if src.uses_root else {}))
    native_split = split if src.splits else "all"
    key = json.dumps([source, native_split, kwargs], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = src.build(split=native_split, **kwargs) if src.splits else src.build(**kwargs)
    raw = cache[key]
    if split == native_split:
        return raw, np.arange(len(raw))
    order = np.random.default_rng(0).permutation(len(raw))
    n_test = round(_POOL_TEST_FRACTION * len(raw))
    return raw, np.sort(order[:n_test] if split == "test" else order[n_test:])


def select_classes(
    raw: RawSet, indices: np.ndarray, classes: list[int] | None, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, labels)`` of the images of ``classes``, labels relabelled to positions in ``classes``."""
    labels = raw.labels[indices]
    if classes is None:
        return indices, labels
    if not raw.class_names:
        raise ValueError(f"{where}.classes: the source is unlabelled, it has no classes to select")
    if max(classes) >= len(raw.class_names):
        raise ValueError(f"{where}.classes: {classes} out of range for {len(raw.class_names)} classes")
    lookup = np.full(len(raw.class_names), -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    keep = lookup[labels] >= 0
    return indices[keep], lookup[labels[keep]]


class LazyImages:
    """Image files decoded and formatted to uint8 ``[C, S, S]`` on access (see :func:`format_images`)."""

    def __init__(self, files: list[Path], channels: int, size: int) -> None:
        self.files, self.channels, self.size = files, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        image = torch.from_numpy(read_image(self.files[i])).permute(2, 0, 1)[None]
        return format_images(image, self.channels, self.size)[0]


def make_images(raw: RawSet, indices: np.ndarray, channels: int, size: int) -> Tensor | LazyImages:
    """The images ``raw[indices]`` as uint8 ``[N, channels, size, size]`` (lazily for file sources)."""
    if isinstance(raw.images, np.ndarray):
        return format_images(torch.from_numpy(raw.images[indices]).permute(0, 3, 1, 2), channels, size)
    return LazyImages([raw.images[i] for i in indices], channels, size)


class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """``(image, target)`` pairs: uint8 ``[C, S, S]`` (after ``augment``, if any) and a long scalar target.

    Normalisation happens per batch, in the DataLoader's ``collate_fn`` (:class:`NormalizeCollate`).
    """

    def __init__(
        self, images: Tensor | LazyImages, targets: Tensor, augment: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets, self.augment = images, targets, augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = self.images[i]
        return (self.augment(image) if self.augment is not None else image), self.targets[i]


def folder_dataset(
    path: str | Path, root: str | None, channels: int, size: int, skip_unreadable: bool = False
) -> tuple[list[Path], ImageDataset]:
    """Every image under ``path`` (recursively, sorted; relative: under ``root``) as ``channels`` x ``size`` x
    ``size`` images whose targets are their row indices into the returned file list (for scoring a folder;
    ``skip_unreadable``: see :func:`imagefolder`)."""
    raw = imagefolder(str(path), root=root, skip_unreadable=skip_unreadable)
    files = list(raw.images)
    idx = np.arange(len(files))
    return files, ImageDataset(make_images(raw, idx, channels, size), torch.from_numpy(idx).long())
