"""Checks across the DataModule's set specs (each spec checks itself), and its plain-text set summary."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_ood.data.datasets import RESERVED_NAMES, AuxSetSpec, IDSetSpec, OODSetSpec
from lightning_ood.data.derived import TestSetBuilder

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
