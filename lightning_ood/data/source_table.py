"""The table of image sources by name: how each is built, its native splits, and the config checks of a source.

See :mod:`lightning_ood.data.datasets` for what the splits of a pool source are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_ood.data import imglist as openood
from lightning_ood.data import sources as off
from lightning_ood.data.sources import RawSet
from lightning_ood.data.sources_torchvision import check_imagefolder, imagefolder, torchvision_builder

SPLITS = ("train", "test", "all")


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
        check: ``check(root=root, **options)``, run by ``prepare_data`` once per node before any set is built:
            a check too costly for every rank at every start (e.g. that every file of a list or folder is an
            image), remembered so that ``build`` (on every rank) and later starts only read its result.
    """

    build: Callable[..., RawSet]
    num_classes: int | None
    channels: int | None = None
    size: int | None = None
    splits: bool = False
    uses_root: bool = False
    prepare: Callable[..., None] | None = None
    check: Callable[..., object] | None = None


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
    "imagefolder": Source(imagefolder, None, uses_root=True, check=check_imagefolder),
    "imglist": Source(openood.imglist, None, uses_root=True, check=openood.check_imglist),
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
