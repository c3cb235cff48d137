"""Speed and memory of ``KNN`` scoring against faiss exact inner-product search (``faiss.IndexFlatIP``).

Synthetic unit-norm Gaussian features; both engines return the exact k-th largest cosine per query, and the
script checks they agree. Prints a Markdown table: queries/s (best wall time of ``--repeats`` runs, engines
interleaved), queries per CPU-second (less sensitive to other load on a shared machine), the peak extra
resident memory while scoring (the bank itself excluded; Linux ``/proc/self/status`` VmHWM after resetting
it, else ``ru_maxrss``; memory the allocator already holds is not counted) and the speed ratio
ours / faiss (> 1: ours is faster). faiss is optional (``pip install -e ".[bench]"``); without it only our
rows are printed.

    python benchmarks/knn_vs_faiss.py --bank-sizes 60000 1000000 --dim 512 --queries 2000 --k 1 50
    python benchmarks/knn_vs_faiss.py --bank-sizes 5000 --queries 200      # a quick run
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from memory import reset_peak, rss_mb  # benchmarks/memory.py (run as a script from the repo root)

from lightning_ood.detectors import KNN, DetectorInputs

try:
    import faiss
except ImportError:  # the `bench` extra
    faiss = None

Runner = Callable[[], np.ndarray]


def unit_rows(n: int, dim: int, seed: int, block: int = 65536) -> torch.Tensor:
    """``[n, dim]`` float32 Gaussian rows scaled to unit norm, generated block by block (no float64 copy)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for start in range(0, n, block):
        rows = torch.randn(min(block, n - start), dim, generator=gen)
        out[start : start + block] = torch.nn.functional.normalize(rows, dim=1)
    return out


def peak_extra_mb(run: Runner) -> tuple[np.ndarray, float]:
    """Run once (also the warm-up); returns the result and the peak resident memory it added, in MB."""
    gc.collect()
    before = rss_mb("VmRSS")
    reset_peak()
    result = run()
    return result, max(rss_mb("VmHWM") - before, 0.0)


def best_times(runs: dict[str, Runner], repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-``repeats`` (wall seconds, process CPU seconds) per engine, engines interleaved so a busy
    shared machine slows them alike."""
    best = {name: (math.inf, math.inf) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def fitted_knn(bank: torch.Tensor, k: int, chunk_size: int) -> KNN:
    """A KNN whose bank is ``bank`` (already unit rows), loaded as a checkpoint would be."""
    det = KNN(k=k, chunk_size=chunk_size)
    det.load_state_dict({"bank": bank, "_fitted": torch.tensor(True)})
    return det


def ours_runner(det: KNN, queries: torch.Tensor, batch_size: int) -> Runner:
    """Score ``queries`` in test-loop-sized batches; returns the k-th largest cosine per query."""

    def run() -> np.ndarray:
        parts = [
            det(DetectorInputs(logits=torch.empty(0), features=queries[i : i + batch_size]))
            for i in range(0, len(queries), batch_size)
        ]
        return -torch.cat(parts).numpy()

    return run


def faiss_runner(index: object, queries: torch.Tensor, k: int) -> Runner:
    """One exact ``IndexFlatIP.search`` of all queries (faiss blocks them internally)."""
    q = queries.numpy()

    def run() -> np.ndarray:
        sims, _ = index.search(q, k)  # type: ignore[attr-defined]
        return sims[:, k - 1]

    return run


def parse_args() -> argparse.Namespace:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[60_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--batch-size", type=int, default=1024, help="queries per KNN.score call")
    parser.add_argument("--chunk-size", type=int, default=8192, help="KNN chunk_size (bank rows per chunk)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine (best is kept)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if faiss is None:
        print("faiss is not installed (pip install faiss-cpu, or the `bench` extra): timing KNN only.\n")
    else:
        faiss.omp_set_num_threads(args.threads)
    print(
        f"D={args.dim}, {args.queries} queries, KNN batch {args.batch_size} x chunk {args.chunk_size}, "
        f"{args.threads} threads, best of {args.repeats}, torch {torch.__version__}"
        + ("" if faiss is None else f", faiss {faiss.__version__}")
        + "\n"
    )
    rows = [
        "| bank N | k | engine | queries/s | queries per CPU-s | peak extra MB | bank MB | ours / faiss "
        "| max abs diff |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    queries = unit_rows(args.queries, args.dim, seed=1)
    for n in args.bank_sizes:
        det = fitted_knn(unit_rows(n, args.dim, seed=0), 1, args.chunk_size)  # the bank lives in `det` only
        bank_mb = det.bank.nbytes / 2**20
        index = None
        if faiss is not None:
            index = faiss.IndexFlatIP(args.dim)
            index.add(det.bank.numpy())  # faiss keeps its own copy
        for k in args.k:
            det.k = k
            runs = {"KNN (ours)": ours_runner(det, queries, args.batch_size)}
            if index is not None:
                runs["faiss IndexFlatIP"] = faiss_runner(index, queries, k)
            results = {name: peak_extra_mb(run) for name, run in runs.items()}
            times = best_times(runs, args.repeats)
            ours_wall = times["KNN (ours)"][0]
            for name, (result, mb) in results.items():
                wall, cpu = times[name]
                ratio = diff = ""
                if name != "KNN (ours)":
                    ratio = f"{wall / ours_wall:.2f}"
                    diff = f"{float(np.abs(results['KNN (ours)'][0] - result).max()):.1e}"
                rows.append(
                    f"| {n} | {k} | {name} | {len(queries) / wall:,.0f} | {len(queries) / cpu:,.0f} | "
                    f"{mb:,.0f} | {bank_mb:,.0f} | {ratio} | {diff} |"
                )
                print(rows[-1], flush=True)
        del det, index
        gc.collect()
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
