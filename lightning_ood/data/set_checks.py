"""Checks across the DataModule's set specs (each spec checks itself) and of its settings, and its set summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_ood.data.datasets import (
    ID_PARTS,
    RESERVED_NAMES,
    AuxSetSpec,
    IDSetSpec,
    OODSetSpec,
    resolve_split,
)
from lightning_ood.data.derived import TestSetBuilder
from lightning_ood.data.id_splits import source_label

if TYPE_CHECKING:
    from lightning_ood.data.datamodule import OODDataModule

Spec = IDSetSpec | OODSetSpec | AuxSetSpec


def overlap(a: Spec, b: Spec) -> bool:
    """Whether two sets draw from the same source with common classes (``classes=None``: all of them)."""
    if a.source != b.source or a.options != b.options:
        return False
    return a.classes is None or b.classes is None or bool(set(a.classes) & set(b.classes))


def check_other_sets(id_set: IDSetSpec, ood_sets: Sequence[OODSetSpec], aux_set: AuxSetSpec | None) -> None:
    """Unique OOD set names; no OOD or aux set that shares a source and classes with the ID set; aux outliers
    disjoint (by spec) from every test OOD set. Their content is checked when the aux set is built."""
    names = [s.name for s in ood_sets]
    for spec in ood_sets:
        if names.count(spec.name) > 1:
            raise ValueError(f"ood_sets: names must be unique, got {names}")
        if overlap(spec, id_set):
            raise ValueError(f"OOD set {spec.name!r}: same source and classes as the ID set")
    for spec, what in [(id_set, "the ID set"), *((s, f"OOD set {s.name!r}") for s in ood_sets)]:
        if aux_set is not None and overlap(aux_set, spec):
            raise ValueError(f"aux_set: same source and classes as {what}; aux outliers must be disjoint")


def derived_set_groups(builders: Sequence[TestSetBuilder], ood_sets: Sequence[OODSetSpec]) -> dict[str, str]:
    """``{name: group}`` of the builders' sets; names unique across all test sets and not reserved."""
    groups: dict[str, str] = {}
    taken = {s.name for s in ood_sets}
    for builder in builders:
        for name, group in builder.set_groups(list(ood_sets)).items():
            if name in taken or name in groups or name in RESERVED_NAMES or "/" in name:
                raise ValueError(f"test_set_builders: set name {name!r} is taken, reserved or has a '/'")
            groups[name] = group
    return groups


def text_table(head: str, rows: Sequence[Sequence[str]]) -> str:
    """``head`` then ``rows`` as aligned columns (the last one right-aligned), indented by two spaces."""
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)), r[-1].rjust(widths[-1])])
        for r in rows
    ]
    return "\n".join([head, *("  " + line for line in lines)])


def check_ood_val_set(
    ood_val: AuxSetSpec | None, id_set: IDSetSpec, ood_sets: Sequence[OODSetSpec], val_fraction: float
) -> None:
    """The OOD validation set shares no source and classes with a test set; ``id_set.val`` needs
    ``val_fraction`` 0 (the validation images come from their own source, nothing is held out of train)."""
    if id_set.val is not None and val_fraction != 0:
        raise ValueError(
            f"data.val_fraction={val_fraction}, but id_set.val gives the validation images: set "
            "data.init_args.val_fraction=0 (nothing is held out of train then)"
        )
    if ood_val is None:
        return
    for spec, what in [(id_set, "the ID set"), *((s, f"OOD set {s.name!r}") for s in ood_sets)]:
        if overlap(ood_val, spec):
            raise ValueError(f"ood_val_set: same source and classes as {what}; it must never be a test set")


def native_value(value: int | None, native: int | None, key: str, source: str) -> int:
    """``value``, else the ID source's native one; fails naming ``key`` when neither is known."""
    if value is None and native is None:
        raise ValueError(f"{key} is required: source {source!r} has no fixed native {key}")
    return value if value is not None else native  # type: ignore[return-value]


def per_channel(value: float | list[float], channels: int, key: str) -> tuple[float, ...]:
    """One value per channel from one value or a list of ``channels`` values; fails naming ``key``."""
    values = [value] * channels if isinstance(value, int | float) else list(value)
    if len(values) != channels:
        raise ValueError(f"{key} needs 1 or {channels} values (channels={channels}), got {value}")
    return tuple(float(v) for v in values)


def set_summary(dm: OODDataModule) -> str:
    """The DataModule's sets as a plain-text table: name, group, source, split and size (after ``setup``)."""
    rows = [("set", "group", "source", "split", "size")]
    for part in ID_PARTS:
        dataset = dm.test_dataset("id") if part == "test" else dm._splits[part]
        resolved = dm.id_set.resolve(part) if dm.id_set.per_split else None
        if resolved is not None:
            where, split = source_label(resolved.source, resolved.options), resolved.split
        else:
            where, split = dm.dataset_name, "test" if part == "test" else "train"
        rows.append((f"id/{part}", "id", where, split, str(len(dataset))))
    others = [(s.name, s.group, s, dm.test_dataset(s.name)) for s in dm.ood_sets]
    for key, group, spec in [
        ("aux", "aux", dm.aux_set),
        ("aux_val", "aux", dm.aux_set),
        ("ood_val", "val", dm.ood_val_set),
    ]:
        if key in dm._splits:
            others.append((key, group, spec, dm._splits[key]))
    for name, group, spec, dataset in others:
        split = resolve_split(spec.source, spec.split, name)
        rows.append((name, group, source_label(spec.source, spec.options), split, str(len(dataset))))
    head = (
        f"OODDataModule: ID {dm.dataset_name} ({dm.num_classes} classes), images "
        f"{dm.channels}x{dm.image_size}x{dm.image_size}, mean {dm.mean}, std {dm.std}"
    )
    return text_table(head, rows)
