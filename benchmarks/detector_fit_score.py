"""Fit time, score time and peak memory of every post-hoc detector on synthetic Gaussian class clusters.

For each (detector, N, C) the parent process starts a fresh worker process (so that peak RSS belongs to one
measurement) which:

1. builds a random head ``nn.Linear(D, C)``, the class means and the ``--test`` scoring features (seeded);
2. **fit**: streams N training rows through ``update`` in batches of ``--fit-batch`` and calls ``finalize``.
   Each batch (float32 features ``mu_y + noise``, seeded; its logits where the detector consumes them) is
   generated inside the loop, so no N x D array exists outside the detector. ``fit s`` is the wall time of
   ``update`` + ``finalize`` only (generation excluded);
3. **score**: scores the test features in batches of ``--score-batch``; ``score ms / 1k`` is wall time per 1,000
   samples, after an untimed warm-up call on 64 samples. A slow detector stops after
   ``--score-budget`` seconds and is timed on the batches it scored (the notes say how many).

Memory: ``fit peak MB`` / ``score peak MB`` are the peak resident memory added during that phase, over the
process's resident memory just before it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
after ``gc`` + ``malloc_trim``), i.e. the detector's own accumulators, temporaries and fitted state; ``state MB``
is the size of the fitted buffers kept for scoring (what a checkpoint stores). ODIN is not benchmarked: it runs
the network's forward and backward pass itself, so its cost is the network's, not the detector's.

A (detector, N, C) whose fit, predicted from the same detector at the previous (smaller) N as
``update time * N ratio + finalize time``, exceeds ``--timeout`` is reported as skipped with that reason; a
worker that runs past ``--timeout`` is killed and reported as such.

    nice -n 5 python benchmarks/detector_fit_score.py --out bench_detectors.md        # the full grid
    python benchmarks/detector_fit_score.py --quick                                      # a smoke run
    python benchmarks/detector_fit_score.py --n 60000 --c 100 --detectors knn vim react
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from memory import rss_mb, settle  # benchmarks/memory.py (run as a script from the repo root)
from torch import Tensor, nn

from lightning_ood.detectors import (
    ASH,
    GEN,
    KNN,
    MSP,
    RMD,
    ClassMeanCosine,
    ClassMeanEuclidean,
    Detector,
    DetectorInputs,
    Energy,
    Entropy,
    Mahalanobis,
    MaxLogit,
    ReAct,
    ViM,
)

#: Row label -> constructor (paper defaults). ODIN is left out: it needs a network (see the module docstring).
DETECTORS: dict[str, Callable[[], Detector]] = {
    "msp": MSP,
    "max_logit": MaxLogit,
    "energy": Energy,
    "entropy": Entropy,
    "gen": GEN,
    "ash": ASH,
    "mahalanobis": Mahalanobis,
    "mahalanobis_per_class": lambda: Mahalanobis(covariance="per_class"),
    "rmd": RMD,
    "class_mean_euclidean": ClassMeanEuclidean,
    "class_mean_cosine": ClassMeanCosine,
    "knn": KNN,
    "vim": ViM,
    "react": ReAct,
}
ODIN_ROW = "| odin | – | – | skipped: needs a network (own forward/backward pass on the inputs) | | | | | |"


# -- memory --------------------------------------------------------------------------------------------------


def state_mb(det: Detector) -> float:
    return sum(b.nbytes for b in det.buffers()) / 2**20


# -- worker: one (detector, N, C) ----------------------------------------------------------------------------
class Data:
    """Seeded Gaussian class clusters: ``z = mu_y + noise``, ``mu_c ~ N(0, 4 I)``, ``noise ~ N(0, I)``."""

    def __init__(self, dim: int, classes: int, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.classes = classes
        self.means = 2.0 * torch.randn(classes, dim, generator=self.gen)
        self.head = nn.Linear(dim, classes).requires_grad_(False)
        nn.init.normal_(self.head.weight, std=dim**-0.5, generator=self.gen)

    def batch(self, size: int, with_logits: bool) -> tuple[DetectorInputs, Tensor]:
        y = torch.randint(self.classes, (size,), generator=self.gen)
        z = self.means[y] + torch.randn(size, self.means.shape[1], generator=self.gen)
        # Detectors that do not read logits get a zero-cost [B, C] view (its width still tells C).
        logits = self.head(z) if with_logits else torch.zeros(()).expand(size, self.classes)
        return DetectorInputs(logits=logits, features=z, head=self.head), y

    def batches(self, n: int, size: int, with_logits: bool) -> Iterator[tuple[DetectorInputs, Tensor]]:
        for start in range(0, n, size):
            yield self.batch(min(size, n - start), with_logits)


def fit(det: Detector, data: Data, n: int, batch_size: int) -> dict[str, float]:
    base = settle()
    update_s = 0.0
    det.reset()
    for inputs, y in data.batches(n, batch_size, with_logits="logits" in det.requires):
        start = time.perf_counter()
        det.update(inputs, y)
        update_s += time.perf_counter() - start
        del inputs, y
    start = time.perf_counter()
    det.finalize()
    finalize_s = time.perf_counter() - start
    return {"update_s": update_s, "finalize_s": finalize_s, "fit_peak_mb": rss_mb("VmHWM") - base}


def score(det: Detector, tests: list[DetectorInputs], budget_s: float) -> dict[str, float]:
    base = settle()
    times, rows, out = [], [], []  # the untimed warm-up call below is on 64 samples
    with torch.inference_mode():
        first = tests[0]
        det(DetectorInputs(logits=first.logits[:64], features=first.features[:64], head=first.head))
        for inputs in tests:
            start = time.perf_counter()
            out.append(det(inputs))
            times.append(time.perf_counter() - start)
            rows.append(inputs.logits.shape[0])
            if sum(times) > budget_s:
                break
    peak = rss_mb("VmHWM") - base
    if not torch.isfinite(torch.cat(out).double()).any():
        raise RuntimeError(f"{det.name}: no finite score")
    ms_per_1k = 1e6 * sum(times) / sum(rows)
    return {"score_ms_per_1k": ms_per_1k, "score_peak_mb": peak, "scored": sum(rows)}


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    data = Data(spec["dim"], spec["classes"], seed=spec["seed"])
    test_gen = Data(spec["dim"], spec["classes"], seed=spec["seed"])  # same clusters, own stream
    test_gen.gen.manual_seed(spec["seed"] + 1)
    tests = [test_gen.batch(size, True)[0] for size in _chunks(spec["test"], spec["score_batch"])]
    det = DETECTORS[spec["detector"]]()
    result: dict[str, float] = {"needs_fit": det.needs_fit}
    if det.needs_fit:
        result |= fit(det, data, spec["n"], spec["fit_batch"])
    result["state_mb"] = state_mb(det)
    result |= score(det, tests, spec["score_budget"])
    return result


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


# -- parent: the grid ----------------------------------------------------------------------------------------
def run_one(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"killed after the {timeout:.0f} s timeout"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"worker failed (rc {proc.returncode}): {tail[:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted_fit_s(prev: dict | None, n: int) -> float | None:
    """Fit time at ``n`` from the same detector and C at a smaller N: updates scale with N, finalize not."""
    if not prev or "update_s" not in prev:
        return None
    return prev["update_s"] * n / prev["n"] + prev["finalize_s"]


def fmt_row(name: str, n: int | None, c: int, r: dict, test: int) -> str:
    n_txt = "–" if n is None else f"{n:,}"
    if "skipped" in r:
        return f"| {name} | {n_txt} | {c} | skipped: {r['skipped']} | | | | | |"
    fit_s = f"{r['update_s'] + r['finalize_s']:.2f}" if r["needs_fit"] else "– (no fit)"
    fit_mb = f"{r['fit_peak_mb']:,.0f}" if r["needs_fit"] else "–"
    notes = []
    if r["needs_fit"]:
        notes.append(f"finalize {r['finalize_s']:.2f} s")
    if r["scored"] < test:
        notes.append(f"score timed on {r['scored']:,} of {test:,}")
    return (
        f"| {name} | {n_txt} | {c} | {fit_s} | {r['score_ms_per_1k']:,.1f} | {fit_mb} | "
        f"{r['score_peak_mb']:,.0f} | {r['state_mb']:,.1f} | {'; '.join(notes)} |"
    )


def grid(args: argparse.Namespace) -> list[str]:
    rows = [
        "| detector | N | C | fit s | score ms / 1k | fit peak MB | score peak MB | state MB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    print("\n".join(rows), flush=True)
    done: dict[tuple[str, int], dict] = {}  # (detector, C) -> last result, for the skip prediction
    for c in args.c:
        for name in args.detectors:
            fits = DETECTORS[name]().needs_fit
            for n in sorted(args.n) if fits else [None]:
                guess = predicted_fit_s(done.get((name, c)), n) if fits else None
                if guess is not None and guess > args.timeout:
                    r = {"skipped": f"predicted fit {guess:,.0f} s > {args.timeout:.0f} s timeout"}
                else:
                    spec = {
                        k: getattr(args, k)
                        for k in ("dim", "test", "fit_batch", "score_batch", "seed", "threads")
                    }
                    spec |= {"detector": name, "n": n or 0, "classes": c, "score_budget": args.score_budget}
                    r = run_one(spec, args.timeout)
                    done[(name, c)] = r | {"n": n}
                rows.append(fmt_row(name, n, c, r, args.test))
                print(rows[-1], flush=True)
    if args.odin:
        rows.append(ODIN_ROW)
    return rows


def header(args: argparse.Namespace) -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"D={args.dim}, fit batch {args.fit_batch}, {args.test:,} test samples in batches of {args.score_batch}, "
        f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} (default {torch.get_num_threads()} threads, "
        f"run with --threads {args.threads}), "
        f"load average at start {load}, timeout {args.timeout:.0f} s per run, score budget {args.score_budget:.0f} s"
    )


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def parse_args() -> argparse.Namespace:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    p.add_argument("--n", type=int, nargs="+", default=[60_000, 1_000_000], help="training set sizes")
    p.add_argument("--c", type=int, nargs="+", default=[10, 100, 1000], help="numbers of classes")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--test", type=int, default=10_000, help="test samples scored")
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    p.add_argument("--fit-batch", type=int, default=4096)
    p.add_argument("--score-batch", type=int, default=1024)
    p.add_argument("--score-budget", type=float, default=20.0, help="stop scoring after this many seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per (detector, N, C) worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads per worker (on a loaded machine 1 can beat oversubscribed OpenMP/MKL threads)",
    )
    p.add_argument("--no-odin", dest="odin", action="store_false", help="omit the ODIN 'skipped' row")
    p.add_argument("--quick", action="store_true", help="smoke run: N=5000, C=10, D=64, 2048 test samples")
    p.add_argument("--out", type=Path, help="also write the Markdown table here (atomically)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.c, args.dim, args.test = [5000], [10], 64, 2048
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    info = header(args)
    print(info + "\n", flush=True)
    rows = grid(args)
    table = "\n".join(rows)
    print("\n" + table)
    if args.out:
        write_atomic(args.out, info + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
