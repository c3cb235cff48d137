"""Markdown tables of the heatmap score against its frozen classifier's detectors (docs/results.md).

    python benchmarks/heatmap_table.py results/heatmap     # what benchmarks/run_heatmap.sh wrote and has finished

Reads ``<root>/<benchmark>/seed<k>/ood_results.json``. Per benchmark: the classifier's ID accuracy, then rows
``heatmap`` (the decoder's score), ``msp`` and ``energy`` (the frozen classifier's logits) and the best feature
detector of :data:`FEATURE_DETECTORS` (the one with the highest mean AUROC over every OOD set and seed: chosen on
the test sets, so a reading, not a tuned method), with AUROC and FPR95 (ID positive and OOD positive) per group
(near / far / all), then AUROC per OOD set; every cell mean ± sample std over seeds, in %, as
``benchmarks/results_table.py`` (whose functions this reuses). Every score of a run comes from the same test pass.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from results_table import environments, id_accuracy, table

from lightning_ood.callbacks.results import read_results

#: Detectors on the classifier's penultimate features (with or without its head).
FEATURE_DETECTORS = ("mahalanobis", "rmd", "knn", "vim", "class_mean_euclidean", "class_mean_cosine")
GROUP_METRICS = ("auroc", "fpr95_idpos", "fpr95_oodpos")
BENCHMARKS = ("fashionmnist", "fashionmnist_openset")


def best_feature_detector(runs: list[list[dict]]) -> str:
    """The feature detector with the highest mean ``all`` AUROC over the runs."""

    def mean_auroc(name: str) -> float:
        hits = [r["auroc"] for rows in runs for r in rows if r["detector"] == name and r["set"] == "all"]
        return statistics.fmean(hits) if hits else float("-inf")

    return max(FEATURE_DETECTORS, key=mean_auroc)


def benchmark_table(paths: list[Path], bench: str) -> str:
    runs = [read_results(p)[1] for p in paths]
    feature = best_feature_detector(runs)
    keep = ("heatmap", "msp", "energy", feature)
    picked = [[r for r in rows if r["detector"] in keep] for rows in runs]
    picked = [sorted(rows, key=lambda r: keep.index(r["detector"])) for rows in picked]
    groups = [g for g in ("near", "far") if any(r["set"] == g for r in runs[0])]
    groups += ["all"] if len(groups) > 1 else []
    sets = list(dict.fromkeys(r["set"] for r in runs[0] if r["kind"] == "set"))
    seeds = ", ".join(p.parent.name for p in paths)
    return "\n".join(
        [
            f"### Heatmap decoder on `{bench}` ({seeds})\n",
            f"Frozen classifier: {id_accuracy(runs)}. Best feature detector (highest mean `all` AUROC, read on "
            f"the test sets): `{feature}`. Every metric in %, mean ± std over seeds.\n",
            f"Environment: {environments(paths)}.\n",
            "Group means:\n",
            table(picked, GROUP_METRICS, groups),
            "AUROC per OOD set:\n",
            table(picked, ("auroc",), sets),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root", type=Path, help="OUT of benchmarks/run_heatmap.sh (default there: results/heatmap)"
    )
    args = parser.parse_args()
    found = False
    for bench in BENCHMARKS:
        paths = sorted((args.root / bench).glob("seed*/ood_results.json"))
        if paths:
            found = True
            print(benchmark_table(paths, bench))
    if not found:
        print(f"No finished runs under {args.root}.")


if __name__ == "__main__":
    main()
