"""Aggregate ``ood_results.json`` files of several seeds into mean ± std Markdown tables (docs/results.md).

    python benchmarks/results_table.py results/fashionmnist/seed*/ood_results.json --title "Fashion-MNIST"

Rows: detectors; columns: ID accuracy, then AUROC and FPR95 (both conventions) for each group mean
(near / far / all) and AUROC per OOD set. Each cell is mean ± sample std over the files given.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from lightning_ood.callbacks.results import read_results


def _cell(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def load(paths: list[Path]) -> list[list[dict]]:
    runs = [read_results(p)[1] for p in paths]
    if not runs or any(not r for r in runs):
        raise SystemExit(f"no rows in {[str(p) for p in paths]}")
    return runs


def environments(paths: list[Path]) -> str:
    """The versions the runs were produced with (one line; every distinct set when they differ)."""
    found = {
        ", ".join(f"{k} {v}" for k, v in read_results(p)[0].get("environment", {}).items()) or "not recorded"
        for p in paths
    }
    return "; ".join(sorted(found))


def table(runs: list[list[dict]], metrics: tuple[str, ...], sets: list[str]) -> str:
    """One row per detector; a column per (set, metric); cells mean ± std over runs, in percent."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for rows in runs:
        for r in rows:
            for m in metrics:
                values[(r["detector"], r["set"], m)].append(r[m])
    detectors = list(dict.fromkeys(r["detector"] for r in runs[0]))
    head = [f"{s} {m}" for s in sets for m in metrics]
    lines = ["| detector | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for det in detectors:
        cells = [_cell(values[(det, s, m)]) for s in sets for m in metrics]
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def id_accuracy(runs: list[list[dict]]) -> str:
    n = len(runs)
    return f"ID accuracy {_cell([rows[0]['id_acc'] for rows in runs])} % ({n} seed{'s' if n > 1 else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--title", default="Results")
    args = parser.parse_args()
    runs = load(args.files)
    groups = [g for g in ("near", "far") if any(r["set"] == g for r in runs[0])]
    if len(groups) > 1:
        groups.append("all")  # with one group, "all" repeats it
    per_set = list(dict.fromkeys(r["set"] for r in runs[0] if r["kind"] == "set"))
    print(f"### {args.title}\n")
    print(f"{id_accuracy(runs)}; every metric in %, mean ± std over seeds.\n")
    print(f"Environment: {environments(args.files)}.\n")
    print(
        "Group means: AUROC, FPR95 with ID positive (`fpr95_idpos`) and with OOD positive (`fpr95_oodpos`).\n"
    )
    print(table(runs, ("auroc", "fpr95_idpos", "fpr95_oodpos"), groups))
    print("AUROC per OOD set.\n")
    print(table(runs, ("auroc",), per_set))


if __name__ == "__main__":
    main()
