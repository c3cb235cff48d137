"""Run expanded grid jobs on submitit: its local executor (N at a time) or SLURM (``afterok`` dependencies).

Locally, a run is submitted once every run it depends on has finished cleanly; a run whose upstream failed is
not started and is reported as blocked. Every other run goes on. On SLURM every unfinished run is submitted at
once, each with ``--dependency=afterok:<upstream job ids>``, and the command returns; the cluster does the
waiting (``squeue``), each run still writes its own ``run.log``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from lightning_ood.grid.run_job import is_done, run_job
from lightning_ood.grid.spec import Job


@dataclass
class Summary:
    """Run names by outcome; ``failed`` and ``blocked`` map a name to the reason (with the log to read)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        lines = [
            f"{len(self.done)} done, {len(self.skipped)} skipped (already finished), {len(self.failed)} failed, "
            f"{len(self.blocked)} not started (an upstream run failed)"
            + (f", {len(self.submitted)} submitted" if self.submitted else "")
        ]
        lines += [f"  FAILED  {name}: {why}" for name, why in self.failed.items()]
        lines += [f"  BLOCKED {name}: {why}" for name, why in self.blocked.items()]
        lines += [f"  SUBMITTED {name}: job {jid}" for name, jid in self.submitted.items()]
        return "\n".join(lines)


def run_local(
    jobs: Sequence[Job],
    folder: Path,
    parallel: int = 1,
    timeout_min: float = 24 * 60,
    gpus_per_job: int = 0,
    poll_s: float = 1.0,
) -> Summary:
    """Run ``jobs`` with ``submitit.LocalExecutor``, at most ``parallel`` at a time, upstream runs first.

    ``gpus_per_job``: the executor exposes GPUs ``0 .. gpus_per_job - 1`` to each run and hides every GPU when
    it is 0 (submitit sets ``CUDA_VISIBLE_DEVICES``); runs on one GPU box share GPU 0 with ``gpus_per_job=1``.
    ``timeout_min`` is per run (submitit's local default is 2 min).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus_per_job)
    summary = Summary()
    waiting = [j for j in jobs if not _skip(j, summary)]
    finished = set(summary.skipped)
    running: dict[str, Any] = {}
    try:
        while waiting or running:
            for job in list(waiting):
                bad = [u for u in job.upstream if u in summary.failed or u in summary.blocked]
                if bad:
                    summary.blocked[job.name] = f"upstream {bad[0]} did not finish"
                    waiting.remove(job)
                elif len(running) < parallel and all(u in finished for u in job.upstream):
                    running[job.name] = executor.submit(run_job, job)
                    waiting.remove(job)
            for name, sub in list(running.items()):
                if sub.done():
                    del running[name]
                    _collect(name, sub, summary, finished)
            if running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for sub in running.values():  # submitit's local jobs outlive this process unless cancelled
            sub.cancel(check=False)
        raise
    return summary


def _skip(job: Job, summary: Summary) -> bool:
    if is_done(job):
        summary.skipped.append(job.name)
        return True
    return False


def _collect(name: str, sub: Any, summary: Summary, finished: set[str]) -> None:
    error = sub.exception()
    if error is None:
        summary.done.append(name)
        finished.add(name)
        return
    lines = [line for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "RunFailed" in line), lines[-1] if lines else "")
    summary.failed[name] = reason.split("RunFailed: ", 1)[-1] + f" (submitit log: {sub.paths.stderr})"


def submit_slurm(
    jobs: Sequence[Job],
    folder: Path,
    partition: str,
    timeout_min: float = 24 * 60,
    gpus_per_job: int = 0,
    cpus_per_job: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Summary:
    """Submit every unfinished run to SLURM, dependents with ``afterok`` on their upstream runs' job ids."""
    executor = submitit.SlurmExecutor(folder=folder)
    params: dict[str, Any] = {"partition": partition, "time": int(timeout_min)}
    if gpus_per_job:
        params["gpus_per_node"] = gpus_per_job
    if cpus_per_job:
        params["cpus_per_task"] = cpus_per_job
    summary = Summary()
    ids: dict[str, str] = {}
    for job in jobs:
        if _skip(job, summary):
            continue
        upstream = [ids[u] for u in job.upstream if u in ids]
        dependency = {"dependency": "afterok:" + ":".join(upstream)} if upstream else {}
        executor.update_parameters(
            **params, job_name=f"ood-{job.name}", additional_parameters={**(extra or {}), **dependency}
        )
        ids[job.name] = summary.submitted[job.name] = executor.submit(run_job, job).job_id
    return summary
