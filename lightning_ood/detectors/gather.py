"""Per-rank ``[n_rank, D]`` rows of a fit: agree on their layout, number them, gather them (also from ranks that
saw no fit batch)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import all_gather_cat, all_reduce_max
from lightning_ood.distributed import distributed_world

_NO_DIM = -(2**62)  # stands for "no rows here" in the max-reduction of -D


def agree_layout(local: Tensor | None, *, device: torch.device, who: str) -> Tensor:
    """This rank's rows, or an empty ``[0, D]`` tensor for a rank without rows, in the dtype every rank uses.

    A collective every rank must enter (one ``all_reduce_max`` of ``[D, -D, is_float64]``): the ranks agree on
    ``D`` and on the dtype, float64 when any rank holds float64 rows (float32 upcasts exactly), else float32.

    Args:
        local: ``[n, D]`` float32 or float64 rows of this rank, or ``None``.
        device: where a rank without rows creates its tensor (the detector's device; NCCL needs the GPU).
        who: the detector's name, for error messages.

    Raises:
        RuntimeError: on every rank, when no rank saw any row (no update at all).
        ValueError: on every rank, when ranks hold rows of different dimensions ``D``.
    """
    has = local is not None
    dim = local.shape[1] if local is not None else 0
    info = [dim, -dim, int(local.dtype == torch.float64)] if has else [0, _NO_DIM, 0]
    where = local.device if local is not None else device
    d_max, neg_d_min, wide = all_reduce_max(torch.tensor(info, dtype=torch.long, device=where)).tolist()
    if neg_d_min == _NO_DIM:
        raise RuntimeError(
            f"detector {who!r}: no ID training features on any rank (finalize() without a prior update() "
            "with features); fit it on a non-empty ID training set"
        )
    if d_max != -neg_d_min:
        raise ValueError(
            f"detector {who!r}: the feature dimension differs across ranks (from {-neg_d_min} to {d_max}); "
            "every rank must fit on features of the same network"
        )
    dtype = torch.float64 if wide else torch.float32
    return torch.empty(0, d_max, dtype=dtype, device=device) if local is None else local.to(dtype)


def row_counts(n_local: int, device: torch.device) -> list[int]:
    """Every rank's number of rows, in rank order (one small all-gather; ``[n_local]`` in one process)."""
    return all_gather_cat(torch.tensor([n_local], dtype=torch.long, device=device)).tolist()


def dataset_index(counts: list[int], device: torch.device) -> Tensor:
    """``[counts[rank]]`` the dataset index of each of this rank's rows.

    When the counts are those of an :class:`~lightning_ood.data.samplers.UnpaddedDistributedSampler` over
    ``N = sum(counts)`` samples (rank ``r`` of ``W`` holds ``r, r + W, ...``: the fit loader), that is the index;
    otherwise the rows are numbered in rank order (rank 0's first). One process: ``0 .. n - 1``.
    """
    rank, world = distributed_world()
    total = sum(counts)
    if len(counts) == world and all(c == len(range(r, total, world)) for r, c in enumerate(counts)):
        return torch.arange(rank, total, world, device=device)
    start = sum(counts[:rank])
    return torch.arange(start, start + counts[rank], device=device)


def gather_rows(local: Tensor | None, *, device: torch.device, who: str) -> Tensor:
    """Concatenate every rank's ``[n_rank, D]`` rows (rank order) on every rank; a collective every rank enters.

    For small fits only (the rows of a ``max_samples`` subset, a class-mean table): no detector gathers an
    ``N x D`` matrix of all ID training features to every rank. Layout and errors as :func:`agree_layout`; also
    raises on every rank when every rank's rows are empty. Outside a distributed run this returns ``local``.
    """
    rows = all_gather_cat(agree_layout(local, device=device, who=who))
    if rows.shape[0] == 0:  # only empty batches: the same result, so the same error, on every rank
        raise RuntimeError(
            f"detector {who!r}: no ID training features on any rank (every fit batch was empty)"
        )
    return rows
