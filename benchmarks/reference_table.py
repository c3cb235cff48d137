"""Headline tables of the results page (docs/results.md) from what ``benchmarks/run_reference.sh`` finished.

    python benchmarks/reference_table.py results/reference

Per benchmark, one row per (method, score) for each method's own scores and the library detectors most often
compared with (:data:`HEADLINE`): ID accuracy, near / far / all AUROC and, on the ``all`` group, AUROC and both
FPR95s with their 95 % bootstrap interval. Every value is the mean ± sample std over seeds (%); an interval is
the mean over seeds of each run's bootstrap bounds (``--ood_eval.bootstrap``), i.e. the typical test-set
sampling uncertainty of one run. Runs are grouped as ``python -m lightning_ood.compare`` groups them (method,
backbone, dataset, differing settings), which also writes the full method x detector tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_ood.compare import find_runs, format_cell, group_runs, summarise

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


def headline(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the :data:`HEADLINE` scores of every group in ``records``."""
    lines = [
        "| method | score | seeds | ID acc | near AUROC | far AUROC | all AUROC [95 % CI] "
        "| all FPR95 ID+ [95 % CI] | all FPR95 OOD+ [95 % CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {m: i for i, m in enumerate(HEADLINE)}
    by_group: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in records:
        by_group.setdefault(r["group"], {})[r["detector"]] = r
    for group in sorted(by_group, key=lambda g: (order.get(g.split(" / ")[0], len(order)), g)):
        method = group.split(" / ")[0]
        for score in HEADLINE.get(method, ()):
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="OUT of benchmarks/run_reference.sh")
    args = parser.parse_args(argv)
    benchmarks = sorted(p.name for p in args.root.iterdir() if p.is_dir() and any(p.glob("*/seed*")))
    if not benchmarks:
        raise SystemExit(f"no finished runs under {args.root}/<benchmark>/<method>/seed<k>/")
    for bench in benchmarks:
        runs = find_runs([str(args.root / bench / "*" / "seed*")])
        # interval bounds only where every row has them (runs without --ood_eval.bootstrap have none)
        bounds = [m + s for m in METRICS for s in ("_lo", "_hi")]
        metrics = [*METRICS, *(b for b in bounds if all(b in r for run in runs for r in run.rows))]
        records = summarise(group_runs(runs), metrics)
        print(f"#### `{bench}`\n")
        print(headline(records))


if __name__ == "__main__":
    main()
