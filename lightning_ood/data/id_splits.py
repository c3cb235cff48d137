"""The ID set's splits as the DataModule reads them: one pool split 80/20, or a source per split; downloads and
once-per-node checks of every set (``prepare_data``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lightning_ood.data.datasets import (
    ID_PARTS,
    SOURCES,
    AuxSetSpec,
    IDSetSpec,
    OODSetSpec,
    load_split,
    resolve_split,
    select_classes,
)
from lightning_ood.data.imglist import file_sha256, list_path
from lightning_ood.data.sources import RawSet

if TYPE_CHECKING:
    from lightning_ood.data.datamodule import OODDataModule

#: (source, split, options, where) of one set to prepare.
Prepared = tuple[str, str, dict, str]


def load_id_part(
    spec: IDSetSpec, part: str, root: str | None, cache: dict[str, RawSet]
) -> tuple[RawSet, np.ndarray, np.ndarray]:
    """``(raw, indices, labels)`` of ID ``part`` (``"train"``, ``"val"`` or ``"test"``), classes selected.

    Without per-split sources, ``part`` is the source's own split (``"train"`` / ``"test"``; ``"val"`` is not
    read here: the DataModule holds ``val_fraction`` of train out). With them, the part's own source.

    Raises:
        ValueError: naming the split, when a label is not a class index of the ID set (e.g. ``-1`` in a list
            given as an ID split), with the first offending image.
    """
    where = f"id_set.{part}" if spec.per_split else "id_set"
    if spec.per_split:
        resolved = spec.resolve(part)
        if resolved is None:
            raise ValueError(f"id_set.{part} is not given")
        source, split, options = resolved.source, resolved.split, resolved.options
    else:
        source, split, options = spec.source, part, spec.options
    raw, idx = load_split(source, split, options, root, cache)
    idx, labels = select_classes(raw, idx, spec.classes, where)
    total = spec.class_count
    bad = np.flatnonzero((labels < 0) | (labels >= total))
    if len(bad):
        first = raw.images[idx[bad[0]]] if isinstance(raw.images, list) else f"image {idx[bad[0]]}"
        raise ValueError(
            f"{where}: {len(bad)} images have labels outside the ID classes [0, {total}) (first: {first}, "
            f"label {labels[bad[0]]}); an ID split's labels must be its class indices"
        )
    return raw, idx, labels


def source_label(source: str, options: dict) -> str:
    """A short name of a source for summaries: ``imglist(test_cifar10.txt)``, ``imagefolder(val)``, ``cifar10``."""
    for key in ("imglist", "path"):
        if key in options:
            return f"{source}({Path(str(options[key])).name})"
    return source


def id_set_name(spec: IDSetSpec) -> str:
    """Short ID-set name for tracking, e.g. ``"fashionmnist"``, ``"fashionmnist[0-5]"``, ``spec.name``."""
    name = spec.name or spec.source
    if spec.name is None and "path" in spec.options:
        name += f"({Path(str(spec.options['path'])).name})"
    classes = spec.classes
    if classes is None:
        return name
    contiguous = len(classes) > 1 and classes == list(range(classes[0], classes[-1] + 1))
    return f"{name}[{classes[0]}-{classes[-1]}]" if contiguous else f"{name}[{','.join(map(str, classes))}]"


def id_parts(spec: IDSetSpec) -> list[tuple[str, str, dict]]:
    """``(source, split, options)`` of each ID split that is read: train and test, and val when given."""
    if not spec.per_split:
        return [(spec.source, "train", spec.options), (spec.source, "test", spec.options)]
    resolved = (spec.resolve(part) for part in ID_PARTS)
    return [(r.source, r.split, r.options) for r in resolved if r is not None]


def prepare_sources(
    id_set: IDSetSpec,
    others: Sequence[tuple[OODSetSpec | AuxSetSpec, str]],
    root: str | None,
    download: bool,
) -> None:
    """Download (when ``download``) and run each source's once-per-node ``check`` for every set."""
    todo: list[Prepared] = [(s, split, o, "id_set") for s, split, o in id_parts(id_set)]
    todo += [(spec.source, resolve_split(spec.source, spec.split, w), spec.options, w) for spec, w in others]
    for source, split, options, _ in todo:
        src = SOURCES[source]
        if src.prepare is not None:
            src.prepare(split, root=root, download=download)
        if src.check is not None:
            src.check(root=root, **options)


def fit_fingerprint(dm: OODDataModule) -> dict[str, object]:
    """What decides the detector-fit images and how they look (see ``OODDataModule.fit_fingerprint``)."""
    fingerprint: dict[str, object] = {
        "id_set": repr(dm.id_set),
        "seed": dm.seed,
        "val_fraction": dm.val_fraction,
        "train_limit": dm.limits["train"],
        "image_size": dm.image_size,
        "channels": dm.channels,
        "mean": dm.mean,
        "std": dm.std,
    }
    if dm.id_set.per_split:  # only then: earlier fingerprints stay what they were
        fingerprint["id_train"] = repr(dm.id_set.resolve("train"))
    source, _, options = id_parts(dm.id_set)[0]
    if source == "imglist":  # the list's content, not only its path, decides the fit images
        fingerprint["id_train_list_sha256"] = file_sha256(list_path(options["imglist"], dm.root))
    if dm.resize_size is not None:
        fingerprint["resize_size"] = dm.resize_size
    return fingerprint
