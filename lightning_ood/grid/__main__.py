r"""Run an experiment grid: ``python -m lightning_ood.grid configs/grids/reference.yaml [options]``.

    python -m lightning_ood.grid configs/grids/reference.yaml --dry-run           # the runs, nothing started
    python -m lightning_ood.grid configs/grids/reference.yaml --parallel 8 --gpus-per-job 1 --set accelerator=gpu
    python -m lightning_ood.grid configs/grids/ssod_sweep.yaml --executor slurm --partition gpu --gpus-per-job 1
    python -m lightning_ood.grid configs/grids/quickstart_seeds.yaml --methods heatmap   # and what it needs
    python -m lightning_ood.grid configs/grids/quickstart_seeds.yaml --methods heatmap --seeds 0 --out other \
        --set heatmap_epochs=2                                                   # a variant, in another folder

Resumable: a run whose result exists is skipped, a run cut short starts again from a clean directory. Each run
writes ``<run dir>/run.log`` and ``<run dir>/wall_s``; submitit's own files go to ``<out>/.submitit/``. The
exit status is 1 when a run failed (the others still ran).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_ood.grid.engine import Summary, run_local, submit_slurm
from lightning_ood.grid.run_job import is_done
from lightning_ood.grid.spec import Job, load_grid, select


def _pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


def describe(jobs: Sequence[Job]) -> str:
    """The expanded runs, one block each: state, directory, upstream runs and the command (``--dry-run``)."""
    lines = []
    for job in jobs:
        state = "done" if is_done(job) else "to run"
        lines.append(f"[{state}] {job.name}  ({job.method}, {job.benchmark}, seed {job.seed})")
        for placeholder, up in job.needs.items():
            lines.append(f"    needs {{{placeholder}}} = best checkpoint of {up}")
        lines.append(f"    {job.entry} " + " ".join(job.args))
    lines.append(f"{len(jobs)} runs, {sum(not is_done(j) for j in jobs)} to run")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Summary | None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ood.grid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("grid", type=Path, help="a grid file, e.g. configs/grids/reference.yaml")
    parser.add_argument("--out", type=Path, help="root of the run directories (default: the grid's `out`)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="replace grid variables")
    parser.add_argument("--methods", nargs="+", help="only these methods (and the runs they depend on)")
    parser.add_argument("--benchmarks", nargs="+", help="only these benchmarks (and the runs they depend on)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (and the runs they depend on)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and their commands, run nothing"
    )
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
    parser.add_argument("--gpus-per-job", type=int, default=0, help="GPUs each run sees (0: none, CPU runs)")
    parser.add_argument("--timeout-min", type=float, default=24 * 60, help="per run, in minutes")
    parser.add_argument("--partition", help="slurm: the partition (required with --executor slurm)")
    parser.add_argument("--cpus-per-job", type=int, help="slurm: cpus_per_task")
    args = parser.parse_args(argv)
    try:
        root, jobs = load_grid(args.grid, _pairs(args.set), args.out)
        jobs = select(jobs, args.methods, args.benchmarks, args.seeds)
    except ValueError as err:
        raise SystemExit(f"{args.grid}: {err}") from err
    if args.dry_run:
        print(describe(jobs))
        return None
    folder = root / ".submitit"
    if args.executor == "slurm":
        if not args.partition:
            raise SystemExit("--executor slurm needs --partition NAME")
        summary = submit_slurm(
            jobs, folder, args.partition, args.timeout_min, args.gpus_per_job, args.cpus_per_job
        )
    else:
        summary = run_local(jobs, folder, args.parallel, args.timeout_min, args.gpus_per_job)
    print(summary.text())
    if summary.failed or summary.blocked:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
