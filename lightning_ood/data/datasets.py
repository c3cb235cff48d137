"""The table of image sources by name, the set specifications the DataModule takes, and seeded subsets.

A source with native train/test splits (``fashionmnist``, the torchvision sets) serves them as they are. Any
other source is one pool of images: ``split="all"`` is the whole pool, and ``"train"``/``"test"`` are a fixed
80/20 split of it (seed 0, whatever the run's seed) so that such a source can also be an ID set. An OOD set's
default split is ``"test"`` for sources with native splits and ``"all"`` otherwise.

An ID set may instead take a source per split (:class:`SplitSource` in ``IDSetSpec.train`` / ``val`` /
``test``), e.g. ImageNet's ``train/`` folder for training and its flat validation list as the ID test set, or
OpenOOD's ``train_cifar10.txt`` / ``val_cifar10.txt`` / ``test_cifar10.txt`` lists (the ``imglist`` source).
"""

from __future__ import annotations

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
from torchvision.transforms.v2 import functional as TF

from lightning_ood.contract import MEAN_GROUPS, OOD_GROUPS
from lightning_ood.data.imglist import ResizedFiles
from lightning_ood.data.source_table import SOURCES, SPLITS, Source, check_options, get_source, resolve_split
from lightning_ood.data.sources import RawSet
from lightning_ood.data.sources_torchvision import imagefolder, read_image
from lightning_ood.data.transforms import format_images, to_channels

GROUPS = OOD_GROUPS
#: Names no OOD set may take: the ID set's, and the group means' in logged keys ``test/<near|far|all>/...``.
RESERVED_NAMES = ("id", *MEAN_GROUPS)
_POOL_TEST_FRACTION = 0.2
__all__ = ["SOURCES", "SPLITS", "Source", "check_options", "get_source", "resolve_split"]  # re-exported


ID_PARTS = ("train", "val", "test")


@dataclass
class SplitSource:
    """Where one split of the ID set comes from (``IDSetSpec.train`` / ``val`` / ``test``).

    Attributes:
        source: a name in :data:`SOURCES`; ``None``: the ID set's ``source``.
        split: the source's split to read; ``None``: ``"all"`` for a source without native splits, the part's
            own name (``"train"`` / ``"test"``) for one with them (a native source's ``val`` must name it).
        options: the source builder's keyword arguments, over the ID set's ``options`` when the source is the
            ID set's (so ``images: images_classic`` is given once and each split names only its list).
    """

    source: str | None = None
    split: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedSplit:
    """A :class:`SplitSource` with the defaults filled in: what ``load_split`` reads."""

    source: str
    split: str
    options: dict[str, Any]


@dataclass
class IDSetSpec:
    """The in-distribution set.

    Attributes:
        source: a name in :data:`SOURCES`.
        classes: original class indices to keep, relabelled ``0..len(classes)-1`` in this order (``None``:
            all); applied to every split.
        num_classes: required only when the source cannot know its class count without reading the data
            (``imagefolder``, ``imglist``); checked against the data at ``setup``.
        options: keyword arguments of the source's builder (e.g. ``{"path": ...}`` for ``imagefolder``).
        train, val, test: a source per split (see the module doc). All ``None`` (default): train and test
            are the source's ``train`` / ``test`` splits and val is ``val_fraction`` of train. Given: ``train``
            and ``test`` are both required; ``val`` is optional (then ``data.val_fraction`` must be 0).
        name: the ID set's name in results and tracking (``None``: derived from the source).
    """

    source: str = "fashionmnist"
    classes: list[int] | None = None
    num_classes: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train: SplitSource | None = field(default=None, repr=False)
    val: SplitSource | None = field(default=None, repr=False)
    test: SplitSource | None = field(default=None, repr=False)
    name: str | None = field(default=None, repr=False)

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
        if self.per_split:
            for part in ID_PARTS:
                self.resolve(part)

    @property
    def per_split(self) -> bool:
        """Whether the splits come from their own sources (``train`` / ``val`` / ``test`` given)."""
        return any(getattr(self, part) is not None for part in ID_PARTS)

    def resolve(self, part: str) -> ResolvedSplit | None:
        """Source, split and options of ID ``part`` (``None``: ``val`` not given); fails naming the key."""
        spec: SplitSource | None = getattr(self, part)
        where = f"id_set.{part}"
        if spec is None:
            if part == "val":
                return None
            given = [p for p in ID_PARTS if getattr(self, p) is not None]
            raise ValueError(
                f"{where} is missing: an ID set with a source per split ({', '.join(f'id_set.{p}' for p in given)} "
                "given) needs id_set.train and id_set.test; id_set.val is optional"
            )
        source = spec.source or self.source
        src = get_source(source, f"{where}.source")
        if src.num_classes == 0:
            raise ValueError(f"{where}.source: {source!r} is unlabelled and cannot be an ID split")
        if src.num_classes is not None and src.num_classes != self.class_total:
            raise ValueError(
                f"{where}.source: {source!r} has {src.num_classes} classes, the ID set {self.class_total}"
            )
        options = {**self.options, **spec.options} if source == self.source else dict(spec.options)
        check_options(source, options, where)
        split = spec.split
        if split is None and src.splits:
            if part == "val":
                raise ValueError(f"{where}.split is required: {source!r} has splits {list(SPLITS[:2])}")
            split = part
        return ResolvedSplit(source, resolve_split(source, split, where), options)

    @property
    def class_total(self) -> int:
        """Number of classes of the source(s), before the class subset."""
        return SOURCES[self.source].num_classes or self.num_classes  # type: ignore[return-value]

    @property
    def class_count(self) -> int:
        """Number of ID classes after the class subset, known without I/O."""
        if self.classes is not None:
            return len(self.classes)
        return self.class_total


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


#: A set's images: uint8 ``[N, C, S, S]`` in memory, or files decoded on access to ``[C, S, S]``.
Images = Tensor | LazyImages | ResizedFiles


def make_images(
    raw: RawSet, indices: np.ndarray, channels: int, size: int, resize_size: int | None = None
) -> Images:
    """The images ``raw[indices]`` as uint8 ``[N, channels, size, size]`` (lazily for file sources).

    ``resize_size``: the shorter side is first resized to it, then the centre ``size`` x ``size`` is cut
    (OpenOOD's / torchvision's ``Resize(256)`` + ``CenterCrop(224)``); files are then resized with PIL as
    torchvision's classic pipeline does (:class:`~lightning_ood.data.imglist.ResizedFiles`). ``None``: resized
    straight to ``size`` (:func:`format_images`).
    """
    if isinstance(raw.images, np.ndarray):
        images = torch.from_numpy(raw.images[indices]).permute(0, 3, 1, 2)
        if resize_size is not None and resize_size != size:
            images = TF.center_crop(
                TF.resize(to_channels(images, channels), resize_size, antialias=True), size
            )
        return format_images(images, channels, size)
    files = [raw.images[i] for i in indices]
    if resize_size is not None:
        return ResizedFiles(files, channels, size, resize_size)
    return LazyImages(files, channels, size)


class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """``(image, target)`` pairs: uint8 ``[C, S, S]`` (after ``augment``, if any) and a long scalar target.

    Normalisation happens per batch, in the DataLoader's ``collate_fn`` (:class:`NormalizeCollate`).
    """

    def __init__(
        self,
        images: Tensor | LazyImages | ResizedFiles,
        targets: Tensor,
        augment: Callable[[Tensor], Tensor] | None = None,
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
    path: str | Path,
    root: str | None,
    channels: int,
    size: int,
    resize_size: int | None = None,
    skip_unreadable: bool = False,
) -> tuple[list[Path], ImageDataset]:
    """Every image under ``path`` (recursively, sorted; relative: under ``root``) as ``channels`` x ``size`` x
    ``size`` images whose targets are their row indices into the returned file list (for scoring a folder;
    ``skip_unreadable``: see :func:`imagefolder`)."""
    raw = imagefolder(str(path), root=root, skip_unreadable=skip_unreadable)
    files = list(raw.images)
    idx = np.arange(len(files))
    images = make_images(raw, idx, channels, size, resize_size)
    return files, ImageDataset(images, torch.from_numpy(idx).long())
