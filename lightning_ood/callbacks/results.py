"""Result rows (method x detector x set or group) and the files they are written to."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_ood.contract import MEAN_GROUPS
from lightning_ood.metrics import METRIC_KEYS
from lightning_ood.metrics.bootstrap import BOOTSTRAP_KEYS
from lightning_ood.run_info import RUN_KEYS

#: Column order of every result file.
COLUMNS = (
    *RUN_KEYS,
    "detector",
    "set",
    "group",
    "kind",
    *METRIC_KEYS,
    "n_id",
    "n_ood",
    "id_acc",
)

#: Columns added after ``COLUMNS`` when the rows carry bootstrap intervals (``OODEvaluation(bootstrap=N)``).
INTERVAL_COLUMNS = tuple(f"{k}_{end}" for k in BOOTSTRAP_KEYS for end in ("lo", "hi"))


def columns_for(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """``COLUMNS``, plus ``INTERVAL_COLUMNS`` when the rows have intervals."""
    return COLUMNS + INTERVAL_COLUMNS if rows and INTERVAL_COLUMNS[0] in rows[0] else COLUMNS


def build_rows(
    per_set: Mapping[str, Mapping[str, Mapping[str, float]]],
    sizes: Mapping[str, int],
    groups: Mapping[str, str],
    n_id: int,
    id_acc: float | None,
    run: Mapping[str, Any],
    intervals: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> list[dict[str, Any]]:
    """Flatten ``per_set[detector][set] -> metrics`` into rows, plus near / far / all means per detector.

    A ``kind="mean"`` row averages each metric over the sets of its group (``all``: every OOD set) and has
    ``n_ood`` = the group's total; groups without sets are left out. ``detector`` names any score (a
    configured detector or the method's own); ``id_acc`` is ``None`` for a method that does not classify.
    ``intervals[detector][set_or_group]`` (from ``bootstrap_intervals``), when given, adds the
    ``INTERVAL_COLUMNS`` to every row.
    """
    rows: list[dict[str, Any]] = []
    base = {k: run.get(k, "") for k in RUN_KEYS}
    for detector, sets in per_set.items():
        for name, metrics in sets.items():
            rows.append(
                {
                    **base,
                    "detector": detector,
                    "set": name,
                    "group": groups[name],
                    "kind": "set",
                    **metrics,
                    "n_id": n_id,
                    "n_ood": sizes[name],
                    "id_acc": id_acc,
                }
            )
        for group in MEAN_GROUPS:
            members = [s for s in sets if group == "all" or groups[s] == group]
            if not members:
                continue
            means = {k: sum(sets[s][k] for s in members) / len(members) for k in METRIC_KEYS}
            rows.append(
                {
                    **base,
                    "detector": detector,
                    "set": group,
                    "group": group,
                    "kind": "mean",
                    **means,
                    "n_id": n_id,
                    "n_ood": sum(sizes[s] for s in members),
                    "id_acc": id_acc,
                }
            )
    if intervals is not None:
        for row in rows:
            row.update(intervals[row["detector"]][row["set"]])
    return rows


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    # Write beside the target and rename: a crash never leaves a half-written file that looks complete.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table with every column (metrics to 4 decimals)."""
    columns = columns_for(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    rows: Sequence[Mapping[str, Any]], directory: Path, run: Mapping[str, Any] | None = None
) -> list[Path]:
    """Write ``ood_results.json``, ``ood_results.csv`` and ``ood_results.md`` into ``directory``.

    The JSON file is ``{"run": run, "rows": rows}``: ``run`` holds what identifies the run (method, backbone,
    dataset, seed) and the environment's versions; the CSV and Markdown files hold the rows.
    """
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns_for(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    outputs = {
        "ood_results.json": json.dumps({"run": dict(run or {}), "rows": list(rows)}, indent=2) + "\n",
        "ood_results.csv": buf.getvalue(),
        "ood_results.md": to_markdown(rows),
    }
    paths = []
    for name, text in outputs.items():
        atomic_write(directory / name, text)
        paths.append(directory / name)
    return paths


def read_results(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(run, rows)`` of an ``ood_results.json`` (a bare list of rows, the 0.1 format, gives ``run = {}``)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return {}, data
    return data["run"], data["rows"]
