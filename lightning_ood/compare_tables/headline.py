"""``headline``: per method group, its own scores and the baselines it is read against, with 95 % intervals.

    python -m lightning_ood.compare headline 'results/reference/fashionmnist/*/seed*' --title '`fashionmnist`'

One row per (group, score) for the scores :data:`HEADLINE` names for the group's method (``--headline
METHOD=S1,S2`` replaces a method's list): runs, ID accuracy, near / far / all AUROC and, on the ``all`` group,
AUROC and both FPR95s with their 95 % bootstrap interval. Values are mean ± sample std over seeds (%); an
interval is the mean over seeds of each run's bootstrap bounds (``--ood_eval.bootstrap``), the typical
test-set sampling uncertainty of one run. Runs are grouped as the full ``compare`` table groups them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_ood.compare import Run, format_cell, group_runs, summarise

#: Scores shown per method: its own, then the baselines it is read against.
HEADLINE: dict[str, tuple[str, ...]] = {
    "classifier": ("msp", "energy", "react", "knn", "mahalanobis", "vim"),
    "ssod": ("ssod", "ood_head", "msp", "vim"),
    "oodformer": ("msp", "mahalanobis_tied", "mahalanobis_class", "class_mean_cosine"),
    "heatmap": ("heatmap",),
    "frozen_encoder": ("linear_probe", "knn", "mahalanobis", "rmd"),
    "diffguard": (
        "diffguard_logits",
        "diffguard_features",
        "diffguard_l2",
        "diffguard_ssim",
        "diffguard_logits_plus_energy",
    ),
}
METRICS = ("auroc", "fpr95_idpos", "fpr95_oodpos")


def _with_interval(record: Mapping[str, Any], metric: str) -> str:
    value, lo, hi = (record.get(f"all/{metric}{s}") for s in ("", "_lo", "_hi"))
    if value is None:
        return "-"
    if lo is None or hi is None:
        return format_cell(value)
    return f"{format_cell(value)} [{100 * lo[0]:.1f}, {100 * hi[0]:.1f}]"


def headline_rows(records: Sequence[Mapping[str, Any]], headline: Mapping[str, Sequence[str]]) -> str:
    """Markdown table of the ``headline`` scores of every group in ``records`` (``compare.summarise``'s)."""
    lines = [
        "| method | score | seeds | ID acc | near AUROC | far AUROC | all AUROC [95 % CI] "
        "| all FPR95 ID+ [95 % CI] | all FPR95 OOD+ [95 % CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {m: i for i, m in enumerate(headline)}
    by_group: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in records:
        by_group.setdefault(r["group"], {})[r["detector"]] = r
    for group in sorted(by_group, key=lambda g: (order.get(g.split(" / ")[0], len(order)), g)):
        for score in headline.get(group.split(" / ")[0], ()):
            r = by_group[group].get(score)
            if r is None:
                continue
            lines.append(
                f"| {group} | {score} | {r['runs']} | {format_cell(r['id_acc'])} | {format_cell(r.get('near/auroc'))} "
                f"| {format_cell(r.get('far/auroc'))} | "
                + " | ".join(_with_interval(r, m) for m in METRICS)
                + " |"
            )
    return "\n".join(lines) + "\n"


def headline_table(runs: Sequence[Run], title: str, headline: Mapping[str, Sequence[str]] = HEADLINE) -> str:
    """``#### title`` and the headline table of ``runs`` (interval columns where every row has them)."""
    bounds = [m + s for m in METRICS for s in ("_lo", "_hi")]
    metrics = [*METRICS, *(b for b in bounds if all(b in r for run in runs for r in run.rows))]
    records = summarise(group_runs(runs), metrics)
    return f"#### {title}\n\n" + headline_rows(records, headline) + "\n"
