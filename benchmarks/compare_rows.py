"""Which result rows moved between two runs of the same configuration, and by how much.

    python benchmarks/compare_rows.py before/ood_results.json after/ood_results.json [--tol 0]

Prints, per score (detector), the largest absolute change of each metric over the OOD sets and group means
(in percentage points), and the rows' ID accuracy before and after; rows present in only one file are listed.
Used to say what a fix changed (docs/results.md).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from lightning_ood.callbacks.results import read_results
from lightning_ood.metrics import METRIC_KEYS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument(
        "--tol", type=float, default=0.0, help="changes at most this large count as unchanged"
    )
    args = parser.parse_args()
    before = {(r["detector"], r["set"]): r for r in read_results(args.before)[1]}
    after = {(r["detector"], r["set"]): r for r in read_results(args.after)[1]}
    for key in sorted(before.keys() ^ after.keys()):
        print(f"only in {'before' if key in before else 'after'}: {key}")
    moved: dict[str, dict[str, float]] = defaultdict(dict)
    for key in sorted(before.keys() & after.keys()):
        for metric in METRIC_KEYS:
            delta = abs(after[key][metric] - before[key][metric])
            if delta > args.tol:
                moved[key[0]][metric] = max(moved[key[0]].get(metric, 0.0), delta)
    accuracy = {r["id_acc"] for r in before.values()}, {r["id_acc"] for r in after.values()}
    print(f"ID accuracy: before {sorted(accuracy[0])}, after {sorted(accuracy[1])}")
    detectors = list(dict.fromkeys(d for d, _ in before))
    print("| score | " + " | ".join(f"max abs change {m} (points)" for m in METRIC_KEYS) + " |")
    print("|---|" + "---:|" * len(METRIC_KEYS))
    for det in detectors:
        cells = [f"{100 * moved[det][m]:.2g}" if m in moved[det] else "0" for m in METRIC_KEYS]
        print(f"| {det} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
