"""DiffGuard's scores against the same classifier's MSP, Energy and best feature detector (docs/results.md).

    python benchmarks/diffguard_table.py results/diffguard/fashionmnist/ood_results.json --title "..."

Rows: MSP, Energy, the feature detector with the highest ``all`` AUROC *on these test sets* (so an optimistic
baseline: it is chosen on the test data), then every ``diffguard_*`` score; columns: AUROC and FPR95 (ID
positive) for the near / far / all means that exist. Values in %.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_ood.callbacks.results import read_results

FEATURE_DETECTORS = (
    "mahalanobis",
    "rmd",
    "class_mean_euclidean",
    "class_mean_cosine",
    "knn",
    "vim",
    "react",
    "ash",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--title", default="DiffGuard")
    args = parser.parse_args()
    _, rows = read_results(args.file)
    by = {(r["detector"], r["set"]): r for r in rows}
    groups = [g for g in ("near", "far", "all") if ("msp", g) in by]
    if groups == ["far", "all"]:
        groups = ["far"]  # one group: "all" repeats it
    features = [d for d in FEATURE_DETECTORS if (d, "all") in by]
    best = max(features, key=lambda d: by[(d, "all")]["auroc"])
    detectors = [
        "msp",
        "energy",
        best,
        *sorted({r["detector"] for r in rows if r["detector"].startswith("diffguard")}),
    ]
    head = [f"{g} {m}" for g in groups for m in ("AUROC", "FPR95")]
    n_id = by[("msp", groups[0])]["n_id"]
    print(f"#### {args.title}\n")
    print(f"ID accuracy {100 * by[('msp', groups[0])]['id_acc']:.1f} % on {n_id} ID test images.\n")
    print("| score | " + " | ".join(head) + " |")
    print("|---|" + "---:|" * len(head))
    for det in detectors:
        label = f"{det} (best feature detector, chosen on test)" if det == best else det
        cells = [f"{100 * by[(det, g)][k]:.1f}" for g in groups for k in ("auroc", "fpr95_idpos")]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
