"""Seconds for bootstrap intervals (AUROC and both FPR95s) of one score on one ID-vs-OOD set.

    python benchmarks/bootstrap_speed.py --n-id 10000 --n-ood 10000 --resamples 1000

Scores are Gaussian (ID N(0, 1), OOD N(1, 1)); best wall time of ``--repeats`` runs of
``bootstrap_intervals``; the printed interval shows the work was done.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_ood.metrics.bootstrap import bootstrap_intervals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-id", type=int, default=10_000)
    parser.add_argument("--n-ood", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randn(args.n_id, generator=gen, dtype=torch.float64)
    ood = torch.randn(args.n_ood, generator=gen, dtype=torch.float64) + 1
    best, out = float("inf"), None
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = bootstrap_intervals(ids, {"ood": ood}, resamples=args.resamples)
        best = min(best, time.perf_counter() - start)
    print(
        f"{args.n_id + args.n_ood:,} scores, {args.resamples} resamples: {best:.2f} s (best of {args.repeats}), "
        f"{torch.get_num_threads()} threads; AUROC 95 % interval "
        f"[{out['ood']['auroc_lo']:.4f}, {out['ood']['auroc_hi']:.4f}]"
    )


if __name__ == "__main__":
    main()
