"""Run a function in N real CPU processes joined by a gloo process group, with a deadline.

``run_ddp(fn, *args)`` spawns ``world_size`` processes, each calling ``fn(rank, *args)`` inside an initialised
``torch.distributed`` group (gloo, a free localhost TCP port), and returns the list of their return values in
rank order. ``fn`` must be a module-level function (it is pickled by reference) and return something
``torch.save`` can write. A collective that never completes (a deadlock) fails the test after ``timeout``
seconds instead of hanging it: gloo's own timeout raises in the waiting process, and the parent terminates
any process still alive at the deadline.

A worker killed by a signal *after* every rank has saved its result and passed the final barrier died in
gloo's teardown (``destroy_process_group``, interpreter exit), not in the code under test; on a loaded
machine gloo occasionally aborts there ("terminate called without an active exception"). ``run_ddp`` then
warns and returns the saved results. A worker that dies before saving its result still fails the test.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0 by the OS, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], args: tuple, world_size: int, port: int, out_dir: str, timeout: float
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # No rank tears its connections down while another may still be talking to it.
        dist.barrier()
        Path(out_dir, f"done{rank}").touch()
    finally:
        dist.destroy_process_group()


def _join(context: mp.ProcessContext, out_dir: str, world_size: int, deadline: float) -> bool:
    """``context.join`` until ``deadline``; a teardown crash after every rank saved its result is only a warning."""
    try:
        return context.join(timeout=max(0.0, deadline - time.monotonic()))
    except mp.ProcessExitedException as error:
        saved = all((Path(out_dir) / f"done{rank}").exists() for rank in range(world_size))
        if error.signal_name is None or not saved:
            raise
        warnings.warn(
            f"gloo teardown crashed after every rank finished ({error}); results kept", stacklevel=2
        )
        for process in context.processes:
            process.join(5)
        return True


def run_ddp(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 60.0) -> list[Any]:
    """``[fn(0, *args), ..., fn(world_size - 1, *args)]``, each run in its own process of one gloo group.

    Raises the first worker's exception (with its traceback) if one fails, and ``TimeoutError`` if the
    workers have not all finished ``timeout`` seconds after the start (e.g. a rank waits in a collective that
    another rank never joins).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        # Collectives time out a little before the parent's deadline, so a deadlock reports where it waited.
        worker_timeout = max(1.0, timeout - 10.0)
        context = mp.start_processes(
            _entry,
            args=(fn, args, world_size, free_port(), out_dir, worker_timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not _join(context, out_dir, world_size, deadline):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(5)
                raise TimeoutError(
                    f"{world_size}-process run of {fn.__name__} did not finish within {timeout:.0f} s: a rank is "
                    "probably waiting in a collective that another rank never entered (deadlock)"
                )
        return [
            torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)
        ]


def module_state_digest(module: torch.nn.Module) -> dict[str, str]:
    """``{name: hash}`` of every parameter and buffer of ``module`` (non-persistent ones too).

    Lightning broadcasts all of them from rank 0 whenever a stage starts (DDP's construction when fitting,
    ``_sync_module_states`` otherwise), so a fitted detector must hold the same values on every rank: rank-local
    state (a KNN bank's share) kept in a buffer would be replaced by rank 0's. Compare the digests across ranks.
    """
    import hashlib

    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    digests = {}
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        digests[name] = f"{tuple(t.shape)}:{t.dtype}:{hashlib.blake2b(raw, digest_size=8).hexdigest()}"
    return digests
