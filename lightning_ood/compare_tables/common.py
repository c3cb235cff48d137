"""Cells, the per-detector table and the run facts every table kind shares (all values in %)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

Rows = list[dict[str, Any]]


def cell(values: Sequence[float], scale: float = 100.0) -> str:
    """``"mean ± sample std"`` (``"mean"`` alone for one value), one decimal."""
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def score_table(runs: Sequence[Rows], metrics: Sequence[str], sets: Sequence[str]) -> str:
    """One row per score (the order of the first run's rows); a column per (set, metric); mean ± std over runs."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for rows in runs:
        for r in rows:
            for m in metrics:
                values[(r["detector"], r["set"], m)].append(r[m])
    detectors = list(dict.fromkeys(r["detector"] for r in runs[0]))
    head = [f"{s} {m}" for s in sets for m in metrics]
    lines = ["| detector | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for det in detectors:
        cells = [cell(values[(det, s, m)]) for s in sets for m in metrics]
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def id_accuracy(runs: Sequence[Rows]) -> str:
    """``"ID accuracy 85.4 ± 1.0 % (3 seeds)"`` from the first row of each run."""
    n = len(runs)
    return f"ID accuracy {cell([rows[0]['id_acc'] for rows in runs])} % ({n} seed{'s' if n > 1 else ''})"


def environments(infos: Sequence[Mapping[str, Any]]) -> str:
    """The versions the runs were produced with (one line; every distinct set when they differ)."""
    found = {
        ", ".join(f"{k} {v}" for k, v in info.get("environment", {}).items()) or "not recorded"
        for info in infos
    }
    return "; ".join(sorted(found))


def group_columns(rows: Rows) -> list[str]:
    """``near`` / ``far`` where the run has them, plus ``all`` when there are both (else it repeats one)."""
    groups = [g for g in ("near", "far") if any(r["set"] == g for r in rows)]
    return [*groups, "all"] if len(groups) > 1 else groups


def set_columns(rows: Rows) -> list[str]:
    """The OOD sets of a run, in its order."""
    return list(dict.fromkeys(r["set"] for r in rows if r["kind"] == "set"))
