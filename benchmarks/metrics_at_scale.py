"""Exact OOD metrics on millions of scores: ``ood_metrics`` against scikit-learn on the same arrays.

``ood_metrics`` gives six metrics (AUROC, AUPR-In, AUPR-Out, both FPR95s, detection error) from ONE sort of the
scores. The reference is what a user of scikit-learn runs for fewer metrics: ``roc_auc_score`` +
``average_precision_score`` + ``roc_curve`` (each sorts the scores again). Both get float64 numpy arrays; the
script checks that AUROC and AUPR-Out agree to 1e-9, then reports the best wall time of ``--repeats`` runs
(the two interleaved, so machine load hits both alike) and the peak resident memory each adds over the inputs
(``VmHWM`` after ``settle``). Scores are Gaussian (ID N(0, 1), OOD N(1, 1)), rounded to ``--decimals`` places
so that ties occur, as they do for real detectors.

    python benchmarks/metrics_at_scale.py --n 10000000 --repeats 3
    python benchmarks/metrics_at_scale.py --n 100000 --repeats 1     # a quick run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from memory import rss_mb, settle  # benchmarks/memory.py (run as a script from the repo root)
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lightning_ood.metrics import ood_metrics


def _ours(scores: np.ndarray, is_ood: np.ndarray) -> dict[str, float]:
    return ood_metrics(scores, is_ood)


def _sklearn(scores: np.ndarray, is_ood: np.ndarray) -> dict[str, float]:
    auroc = roc_auc_score(is_ood, scores)
    aupr = average_precision_score(is_ood, scores)
    fpr, _, _ = roc_curve(is_ood, scores)
    return {"auroc": auroc, "aupr_out": aupr, "fpr_points": len(fpr)}


def _measure(fn, scores, is_ood) -> tuple[float, float, dict]:
    base = settle()
    start = time.perf_counter()
    out = fn(scores, is_ood)
    seconds = time.perf_counter() - start
    return seconds, rss_mb("VmHWM") - base, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000_000, help="scores in total (half ID, half OOD)")
    parser.add_argument(
        "--decimals", type=int, default=4, help="round scores to create ties (negative: no rounding, no ties)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    half = args.n // 2
    is_ood = np.concatenate([np.zeros(half), np.ones(args.n - half)])
    scores = rng.standard_normal(args.n) + is_ood
    if args.decimals >= 0:
        scores = np.round(scores, args.decimals)
    times: dict[str, list[float]] = {"ours": [], "sklearn": []}
    peaks: dict[str, float] = {"ours": 0.0, "sklearn": 0.0}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", _ours), ("sklearn", _sklearn)):
            seconds, peak, out = _measure(fn, scores, is_ood)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
            results[name] = out
    for key in ("auroc", "aupr_out"):
        diff = abs(results["ours"][key] - results["sklearn"][key])
        assert diff < 1e-9, f"{key} differs from scikit-learn by {diff}"
    input_mb = (scores.nbytes + is_ood.nbytes) / 2**20
    print(
        f"N = {args.n:,} scores ({len(np.unique(scores)):,} distinct), inputs {input_mb:.0f} MB, best of {args.repeats}"
    )
    print("| engine | metrics | best s | peak extra MB |")
    print("|---|---|---:|---:|")
    print(f"| lightning-ood `ood_metrics` | 6 (one sort) | {min(times['ours']):.2f} | {peaks['ours']:.0f} |")
    print(
        "| scikit-learn `roc_auc_score` + `average_precision_score` + `roc_curve` | 3 | "
        f"{min(times['sklearn']):.2f} | {peaks['sklearn']:.0f} |"
    )
    print(f"ratio sklearn / ours = {min(times['sklearn']) / min(times['ours']):.2f} (> 1: ours is faster)")
    print(f"AUROC {results['ours']['auroc']:.6f} (both), AUPR-Out {results['ours']['aupr_out']:.6f} (both)")


if __name__ == "__main__":
    main()
