"""Markdown tables of SSOD against its same-network baseline, and of its gamma x alpha sweep (docs/ssod.md).

    python benchmarks/ssod_table.py results/ssod          # what benchmarks/run_ssod.sh wrote and has finished

Comparison (``<root>/compare/<benchmark>/<ssod|baseline>/seed<k>/ood_results.json``): per benchmark, ID accuracy
per method, then rows ``<method>: <score>`` (SSOD's own ``ssod`` and ``ood_head`` and the library detectors of
:data:`SCORES`; ``--all-scores`` for every score) with AUROC, FPR95 ID-positive and FPR95 OOD-positive per group
(near / far / all) and per OOD set; every cell mean ± sample std over seeds, in %, as
``benchmarks/results_table.py`` (whose functions this reuses).

Sweep (``<root>/sweep/gamma<g>_alpha<a>/``): one row per setting with its best ID validation accuracy (the
checkpoint that was tested, from ``log/version_0/metrics.csv``), the chosen setting (highest validation
accuracy; the test OOD sets are never used to choose), and, for reading only, the test metrics of ``ssod`` and
``msp``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

from results_table import id_accuracy, table

from lightning_ood.callbacks.results import read_results

#: Scores shown by default: SSOD's own, and the library detectors most often compared with.
SCORES = ("ssod", "ood_head", "msp", "energy", "mahalanobis", "vim", "knn")
GROUP_METRICS = ("auroc", "fpr95_idpos", "fpr95_oodpos")
BENCHMARKS = ("fashionmnist", "fashionmnist_openset")


def _seed_runs(directory: Path) -> dict[str, list[dict]]:
    """``{"seed0": rows, ...}`` of the finished runs under ``directory``."""
    return {p.parent.name: read_results(p)[1] for p in sorted(directory.glob("seed*/ood_results.json"))}


def _labelled(rows: list[dict], method: str, scores: tuple[str, ...] | None) -> list[dict]:
    keep = [r for r in rows if scores is None or r["detector"] in scores]
    return [{**r, "detector": f"{method}: {r['detector']}"} for r in keep]


def comparison(root: Path, ssod_name: str, scores: tuple[str, ...] | None) -> str:
    """The comparison tables of every benchmark with finished runs of both methods for the same seeds."""
    out = []
    for bench in BENCHMARKS:
        methods = {"ssod": _seed_runs(root / "compare" / bench / ssod_name)}
        methods["baseline"] = _seed_runs(root / "compare" / bench / "baseline")
        seeds = sorted(set(methods["ssod"]) & set(methods["baseline"]))
        if not seeds:
            continue
        runs = [
            _labelled(methods["ssod"][s], "ssod", scores)
            + _labelled(methods["baseline"][s], "baseline", scores)
            for s in seeds
        ]
        first = methods["ssod"][seeds[0]]
        groups = [g for g in ("near", "far") if any(r["set"] == g for r in first)]
        groups += ["all"] if len(groups) > 1 else []
        sets = list(dict.fromkeys(r["set"] for r in first if r["kind"] == "set"))
        out.append(f"### SSOD vs baseline on `{bench}` ({', '.join(seeds)})\n")
        for method in ("ssod", "baseline"):
            out.append(f"- {method}: {id_accuracy([methods[method][s] for s in seeds])}")
        out.append("\nEvery metric in %, mean ± std over seeds. Group means:\n")
        out.append(table(runs, GROUP_METRICS, groups))
        for metric in GROUP_METRICS:
            out.append(f"`{metric}` per OOD set.\n")
            out.append(table(runs, (metric,), sets))
    return "\n".join(out) if out else "No finished comparison runs.\n"


def best_val_acc(run: Path) -> float:
    """The highest ``val/acc`` of a run (that of its best checkpoint, the one tested); NaN when none."""
    path = run / "log" / "version_0" / "metrics.csv"
    if not path.is_file():
        return math.nan
    with path.open() as f:
        values = [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]
    return max(values) if values else math.nan


def _metric(rows: list[dict], score: str, group: str, metric: str) -> str:
    hit = [r[metric] for r in rows if r["detector"] == score and r["set"] == group and r["kind"] == "mean"]
    return f"{100 * hit[0]:.1f}" if hit else "-"


def sweep(root: Path) -> str:
    """One row per (gamma, alpha): validation accuracy (the choice), then test metrics for reading only."""
    found = []
    for run in sorted((root / "sweep").glob("gamma*_alpha*")):
        match = re.fullmatch(r"gamma([0-9.]+)_alpha([0-9.]+)", run.name)
        if match and (run / "ood_results.json").is_file():
            found.append((float(match[1]), float(match[2]), run))
    if not found:
        return "No finished sweep runs.\n"
    found.sort(key=lambda f: (f[0], f[1]))
    vals = {run: best_val_acc(run) for _, _, run in found}
    chosen = max(found, key=lambda f: -math.inf if math.isnan(vals[f[2]]) else vals[f[2]])
    head = ["gamma", "alpha", "val acc (choice)", "test ID acc"]
    head += [
        f"{s} {g} {m}" for s in ("ssod", "msp") for g in ("near", "far") for m in ("auroc", "fpr95_idpos")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for gamma, alpha, run in found:
        rows = read_results(run / "ood_results.json")[1]
        mark = " **(chosen)**" if run == chosen[2] else ""
        cells = [f"{gamma:g}", f"{alpha:g}", f"{100 * vals[run]:.1f}{mark}", f"{100 * rows[0]['id_acc']:.1f}"]
        cells += [
            _metric(rows, s, g, m)
            for s in ("ssod", "msp")
            for g in ("near", "far")
            for m in ("auroc", "fpr95_idpos")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    title = "### SSOD gamma x alpha sweep on `fashionmnist_openset` (seed 0)\n"
    rule = f"\nChosen on ID validation accuracy only: gamma {chosen[0]:g}, alpha {chosen[1]:g}.\n"
    return title + "\n" + "\n".join(lines) + "\n" + rule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="OUT of benchmarks/run_ssod.sh (default there: results/ssod)")
    parser.add_argument("--ssod-name", default="ssod", help="folder name of the SSOD runs (SSOD_NAME)")
    parser.add_argument("--all-scores", action="store_true", help="every score, not only SCORES")
    args = parser.parse_args()
    print(comparison(args.root, args.ssod_name, None if args.all_scores else SCORES))
    print(sweep(args.root))


if __name__ == "__main__":
    main()
