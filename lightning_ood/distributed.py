"""Collectives that are no-ops outside a distributed run (detector fits, score gathering, samplers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op outside distributed runs); returns it."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise max of ``tensor`` over all ranks, in place (no-op outside distributed runs)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (``[n_rank, ...]``, sizes may differ per rank) over all ranks along dim 0."""
    if _distributed():
        from torchmetrics.utilities.distributed import gather_all_tensors

        return torch.cat(gather_all_tensors(tensor), dim=0)
    return tensor


def all_gather_stack(tensor: Tensor) -> Tensor:
    """``[W, ...]``: every rank's ``tensor`` (the same shape and dtype on every rank), stacked in rank order, in
    one ``all_gather``; ``tensor[None]`` outside distributed runs. NCCL needs it on the GPU."""
    if not _distributed():
        return tensor[None]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` outside distributed runs)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank, in place (same shape and dtype on every rank); a
    no-op outside distributed runs. Returns it."""
    if _distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def gathered_order(n: int, world: int) -> np.ndarray:
    """``[n]`` the dataset index of each row when every rank's rows from an :class:`UnpaddedDistributedSampler`
    loader (``lightning_ood.data.samplers``: rank ``r`` of ``W`` takes ``r, r + W, ...``) over ``n``
    samples are concatenated in rank order (as the detector fits and score gathers do)."""
    return (
        np.concatenate([np.arange(rank, n, world) for rank in range(world)]) if n else np.empty(0, np.int64)
    )
