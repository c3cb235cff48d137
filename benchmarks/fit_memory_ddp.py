"""Per-rank peak memory and time of every default detector's fit on 1 and on 2 CPU processes (gloo DDP).

For each detector and world size ``W`` the script starts ``W`` fresh processes (so that peak memory belongs to one
measurement) joined by a gloo process group. Rank ``r`` streams the rows ``r, r + W, ...`` of ``N`` synthetic
``D``-dimensional ID-train features (the :class:`~lightning_ood.data.samplers.UnpaddedDistributedSampler`'s
share) through ``update`` in batches of ``--batch`` and calls ``finalize``. A batch is generated inside the loop
(``relu(mu_y + noise)``, ``C`` classes, seeded by its block of rows, so every world size sees the same rows) and
dropped after ``update``, so no ``N x D`` array exists outside the detector. Then every rank scores the same
``--queries`` test features (the sharded KNN merges top-k across ranks).

Columns: ``fit peak MB`` is the peak resident memory added during the fit over the process's resident memory just
before it (Linux ``VmHWM`` after resetting it, after ``gc`` + ``malloc_trim``; the largest over the ranks), i.e.
the detector's accumulators, temporaries and fitted state; ``ratio`` is that over the 1-process value; ``fit s``
the fit's wall time (slowest rank); ``max |diff|`` the largest absolute difference of the test scores from the
1-process scores. Data generation is excluded from the time but not from the peak (one batch at a time).

    nice -n 5 flock /tmp/cpu-bench.lock python benchmarks/fit_memory_ddp.py --n 200000 --d 2048
    python benchmarks/fit_memory_ddp.py --n 20000 --d 256 --detectors knn react   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import rss_mb, settle  # benchmarks/memory.py (run as a script from the repo root)

from lightning_ood.detectors import (
    KNN,
    RMD,
    ClassMeanCosine,
    ClassMeanEuclidean,
    DetectorInputs,
    LinearProbe,
    Mahalanobis,
    ReAct,
    ViM,
)

BLOCK = 4096  # rows generated from one seed


def make_detector(name: str, probe_epochs: int):
    """The default detectors that fit (the classifier's defaults, and the frozen encoder's linear probe)."""
    return {
        "knn": lambda: KNN(),
        "react": lambda: ReAct(),
        "linear_probe": lambda: LinearProbe(epochs=probe_epochs),
        "mahalanobis": lambda: Mahalanobis(),
        "rmd": lambda: RMD(),
        "vim": lambda: ViM(),
        "class_mean_euclidean": lambda: ClassMeanEuclidean(),
        "class_mean_cosine": lambda: ClassMeanCosine(),
        "mahalanobis_per_class": lambda: Mahalanobis(covariance="per_class"),
    }[name]()


def _means(classes: int, dim: int) -> torch.Tensor:
    return torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))


def _block(b: int, n: int, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + b)
    rows = min(BLOCK, n - b * BLOCK)
    labels = torch.randint(len(means), (rows,), generator=gen)
    return (means[labels] + torch.randn(rows, means.shape[1], generator=gen)).relu(), labels


def _my_rows(n: int, rank: int, world: int, batch: int, means: torch.Tensor):
    """This rank's rows r, r + W, ... of the N rows, in batches (generated block by block)."""
    pending_x, pending_y, size = [], [], 0
    for b in range(-(-n // BLOCK)):
        x, y = _block(b, n, means)
        first = (rank - b * BLOCK) % world
        pending_x.append(x[first::world])
        pending_y.append(y[first::world])
        size += len(pending_x[-1])
        while size >= batch or (b == -(-n // BLOCK) - 1 and size):
            xs, ys = torch.cat(pending_x), torch.cat(pending_y)
            yield xs[:batch].clone(), ys[:batch].clone()  # a fresh tensor per batch, as a network's output
            pending_x, pending_y, size = [xs[batch:]], [ys[batch:]], len(xs) - min(batch, len(xs))


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, name: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=3600),
    )  # fmt: skip
    means = _means(args.classes, args.d)
    head = torch.nn.Linear(args.d, args.classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(args.classes, args.d, generator=torch.Generator().manual_seed(7)) / 40)
        head.bias.zero_()
    queries = (
        means[:1] + torch.randn(args.queries, args.d, generator=torch.Generator().manual_seed(8))
    ).relu()
    det = make_detector(name, args.probe_epochs)
    det.configure(type("Data", (), {"num_classes": args.classes})())
    with torch.no_grad():
        base = settle()
        fit_time = 0.0
        det.reset()
        for x, y in _my_rows(args.n, rank, world, args.batch, means):
            start = time.perf_counter()
            det.update(DetectorInputs(logits=head(x), features=x, head=head), y)
            fit_time += time.perf_counter() - start
            del x, y
        start = time.perf_counter()
        det.finalize()
        fit_time += time.perf_counter() - start
        peak = rss_mb("VmHWM") - base
        det.begin_scoring(1)
        scores = det(DetectorInputs(logits=head(queries), features=queries, head=head))
    result = {"peak_mb": peak, "fit_s": fit_time, "scores": scores.double()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(name: str, world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(world, _free_port(), args, name, out), nprocs=world, start_method="spawn"
        )
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--probe-epochs", type=int, default=2, help="memory does not depend on it; time does")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    names = ["knn", "react", "linear_probe", "mahalanobis", "rmd", "vim", "class_mean_euclidean"]
    parser.add_argument(
        "--detectors", nargs="+", default=[*names, "class_mean_cosine"],
        help="also: mahalanobis_per_class (not a default; its fit peak over the [C, D, D] float64 size)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args()
    print(f"N = {args.n}, D = {args.d}, C = {args.classes}, batch {args.batch}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| detector | processes | fit peak MB per rank | ratio to 1 process | fit s | max \\|diff\\| |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.detectors:
        single = None
        for world in args.worlds:
            ranks = measure(name, world, args)
            peak, fit_s = max(r["peak_mb"] for r in ranks), max(r["fit_s"] for r in ranks)
            if single is None:
                single = {"peak": peak, "scores": ranks[0]["scores"]}
            diff = max(float((r["scores"] - single["scores"]).abs().max()) for r in ranks)
            ratio = peak / single["peak"] if single["peak"] > 0 else float("nan")
            rows.append({"detector": name, "world": world, "peak_mb": peak, "ratio": ratio, "fit_s": fit_s,
                         "max_diff": diff, "rank_peaks_mb": [r["peak_mb"] for r in ranks]})  # fmt: skip
            print(f"| {name} | {world} | {peak:.0f} | {ratio:.2f} | {fit_s:.1f} | {diff:.1e} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
