r"""``sweep``: one row per setting of an override sweep, the setting chosen on a validation metric only.

    python -m lightning_ood.compare sweep 'results/ssod/sweep/*' results/ssod/compare/fashionmnist_openset/ssod/seed0 \
        --vary model.init_args.gamma model.init_args.alpha --scores ssod msp --title "..."

Each run's setting is read from its ``config.yaml`` (the ``--vary`` keys); its validation value is the best
(highest) ``--choose-by`` of its CSV log (``log/version_0/metrics.csv``: that of the checkpoint that was tested),
and the chosen setting is the one with the highest value (the test OOD sets are never used to choose). The
test metrics of ``--scores`` per ``--groups`` and ``--metric`` follow, for reading only. Values in %.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Any

from lightning_ood.compare import Run

CSV_LOG = "log/version_0/metrics.csv"


def best_value(run: Run, key: str) -> float:
    """The highest ``key`` in the run's CSV log; NaN when the log or the key is missing."""
    path = run.path / CSV_LOG
    if not path.is_file():
        return math.nan
    with path.open() as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return max(values) if values else math.nan


def _setting(run: Run, keys: Sequence[str]) -> tuple[Any, ...]:
    missing = [k for k in keys if k not in run.config]
    if missing:
        raise SystemExit(
            f"{run.path}: config.yaml has no {missing} (pass the full keys, e.g. model.init_args.x)"
        )
    return tuple(run.config[k] for k in keys)


def _metric(rows: list[dict], score: str, group: str, metric: str) -> str:
    hit = [r[metric] for r in rows if r["detector"] == score and r["set"] == group and r["kind"] == "mean"]
    return f"{100 * hit[0]:.1f}" if hit else "-"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def sweep_table(
    runs: Sequence[Run],
    vary: Sequence[str],
    title: str,
    choose_by: str = "val/acc",
    scores: Sequence[str] = ("ssod", "msp"),
    groups: Sequence[str] = ("near", "far"),
    metrics: Sequence[str] = ("auroc", "fpr95_idpos"),
) -> str:
    """The sweep table: settings sorted by their values, the choice marked, and the rule that chose it."""
    found = sorted(((_setting(r, vary), r) for r in runs), key=lambda f: f[0])
    values = {id(r): best_value(r, choose_by) for _, r in found}
    chosen = max(found, key=lambda f: -math.inf if math.isnan(values[id(f[1])]) else values[id(f[1])])
    names = [k.rsplit(".", 1)[-1] for k in vary]
    head = [*names, f"{choose_by.split('/')[0]} {choose_by.split('/')[-1]} (choice)", "test ID acc"]
    head += [f"{s} {g} {m}" for s in scores for g in groups for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for setting, run in found:
        mark = " **(chosen)**" if run is chosen[1] else ""
        cells = [_number(v) for v in setting]
        cells += [f"{100 * values[id(run)]:.1f}{mark}", f"{100 * run.rows[0]['id_acc']:.1f}"]
        cells += [_metric(run.rows, s, g, m) for s in scores for g in groups for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    choice = ", ".join(f"{n} {_number(v)}" for n, v in zip(names, chosen[0], strict=True))
    rule = f"\nChosen on ID validation accuracy only: {choice}.\n" if choose_by == "val/acc" else (
        f"\nChosen on the highest {choose_by} only: {choice}.\n"
    )  # fmt: skip
    return f"### {title}\n\n" + "\n".join(lines) + "\n" + rule
