"""What one grid run does where it runs (a submitit worker, locally or on a SLURM node).

The run starts from a clean directory (a run cut short leaves no half state behind), fills in the upstream
checkpoints, runs ``train.py`` / ``evaluate.py`` as a child process with its output in ``<dir>/run.log``, and
records its wall time in ``<dir>/wall_s``. A failed run raises, so that SLURM's ``afterok`` holds back the runs
that depend on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from lightning_ood.grid.spec import CHECKPOINT_GLOB, Job


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and a rename (a crash never leaves a half-written file that looks done).

    The same as ``lightning_ood.callbacks.results.atomic_write``, kept here because importing that package
    loads Lightning and torch: seconds of CPU in every grid worker, which only starts a child process.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFailed(RuntimeError):
    """A run exited with an error; the message names its log."""


def is_done(job: Job) -> bool:
    """Whether ``job`` has finished: its ``ood_results.json`` exists (written atomically at the end of the test),
    or, for ``done: checkpoint`` runs, it exited cleanly (``wall_s``) and left a best checkpoint."""
    if job.done == "results":
        return (job.directory / "ood_results.json").is_file()
    return (job.directory / "wall_s").is_file() and best_checkpoint(job.directory) is not None


def best_checkpoint(directory: Path) -> Path | None:
    """The best checkpoint of a finished run directory (``None`` when there is none)."""
    found = sorted(directory.glob(CHECKPOINT_GLOB))
    return found[-1] if found else None


def command(job: Job) -> list[str]:
    """The child process's command line, with the upstream checkpoints filled in (they must exist)."""
    args = list(job.args)
    for placeholder, upstream in job.needs.items():
        ckpt = best_checkpoint(upstream)
        if ckpt is None:
            raise RunFailed(
                f"{job.name}: the run it needs in {upstream} has no best checkpoint ({CHECKPOINT_GLOB}); "
                "run that one first (it is part of the grid)"
            )
        args = [a.replace("{" + placeholder + "}", str(ckpt)) for a in args]
    return [sys.executable, "-m", "lightning_ood.grid.launch", job.entry, *args]


def write_limited_data(job: Job) -> None:
    """``<dir>/data.yaml``: the data config with ``test_limit`` ID and at most ``ood_limit`` images per OOD set
    (seeded subsets, as ``OODDataModule`` draws them with its ``seed``)."""
    spec = dict(job.limited_data or {})
    config = yaml.safe_load(Path(spec["config"]).read_text())
    args = config["init_args"]
    if spec.get("test_limit") not in (None, "", "None"):
        args["test_limit"] = int(spec["test_limit"])
    if spec.get("ood_limit") not in (None, "", "None"):
        limit = int(spec["ood_limit"])
        for ood_set in args["ood_sets"]:
            ood_set["limit"] = min(limit, ood_set.get("limit") or limit)
    atomic_write(job.directory / "data.yaml", yaml.safe_dump(config, sort_keys=False))


def run_job(job: Job) -> str:
    """Run ``job`` unless it is done; return ``"done"`` or ``"skipped"``; raise :class:`RunFailed` on failure."""
    if is_done(job):
        return "skipped"
    shutil.rmtree(job.directory, ignore_errors=True)
    job.directory.mkdir(parents=True)
    if job.limited_data is not None:
        write_limited_data(job)
    cmd = command(job)
    env = {**os.environ, "WANDB_SILENT": "true"}
    start = time.monotonic()
    with job.log.open("w") as log:
        log.write(f"# started {datetime.now().isoformat(timespec='milliseconds')}\n{' '.join(cmd)}\n\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        raise RunFailed(f"{job.name} exited with code {code}; see {job.log}")
    atomic_write(job.directory / "wall_s", f"{time.monotonic() - start:.0f}\n")
    if not is_done(job):
        raise RunFailed(f"{job.name} exited cleanly but left no {_expected(job)}; see {job.log}")
    return "done"


def _expected(job: Job) -> str:
    return "ood_results.json" if job.done == "results" else f"best checkpoint ({CHECKPOINT_GLOB})"
