"""Experiment grids: benchmarks x methods x seeds x override sweeps, run on submitit (``python -m
lightning_ood.grid``)."""

from lightning_ood.grid.engine import Summary, run_local, submit_slurm
from lightning_ood.grid.run_job import RunFailed, best_checkpoint, is_done, run_job
from lightning_ood.grid.spec import Job, expand, load_grid, select

__all__ = [
    "Job",
    "RunFailed",
    "Summary",
    "best_checkpoint",
    "expand",
    "is_done",
    "load_grid",
    "run_job",
    "run_local",
    "select",
    "submit_slurm",
]
