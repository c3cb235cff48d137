"""``moved``: which result rows moved between two runs of the same configuration, and by how much.

    python -m lightning_ood.compare moved before/ood_results.json after/ood_results.json [--tol 0]

Per score, the largest absolute change of each metric over the OOD sets and group means (percentage points),
and the ID accuracy before and after; rows present in only one run are listed. Used to say what a fix changed.
"""

from __future__ import annotations

from collections import defaultdict

from lightning_ood.compare_tables.common import Rows
from lightning_ood.metrics import METRIC_KEYS


def moved_table(before_rows: Rows, after_rows: Rows, tol: float = 0.0) -> str:
    before = {(r["detector"], r["set"]): r for r in before_rows}
    after = {(r["detector"], r["set"]): r for r in after_rows}
    lines = [
        f"only in {'before' if key in before else 'after'}: {key}"
        for key in sorted(before.keys() ^ after.keys())
    ]
    moved: dict[str, dict[str, float]] = defaultdict(dict)
    for key in sorted(before.keys() & after.keys()):
        for metric in METRIC_KEYS:
            delta = abs(after[key][metric] - before[key][metric])
            if delta > tol:
                moved[key[0]][metric] = max(moved[key[0]].get(metric, 0.0), delta)
    accuracy = {r["id_acc"] for r in before.values()}, {r["id_acc"] for r in after.values()}
    lines.append(f"ID accuracy: before {sorted(accuracy[0])}, after {sorted(accuracy[1])}")
    lines.append("| score | " + " | ".join(f"max abs change {m} (points)" for m in METRIC_KEYS) + " |")
    lines.append("|---|" + "---:|" * len(METRIC_KEYS))
    for det in dict.fromkeys(d for d, _ in before):
        cells = [f"{100 * moved[det][m]:.2g}" if m in moved[det] else "0" for m in METRIC_KEYS]
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
