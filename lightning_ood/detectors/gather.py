"""Gather per-rank ``[n_rank, D]`` rows of a fit, also from ranks that saw no fit batch."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import all_gather_cat, all_reduce_max

_NO_DIM = -(2**62)  # stands for "no rows here" in the max-reduction of -D


def gather_rows(local: Tensor | None, *, device: torch.device, who: str) -> Tensor:
    """Concatenate every rank's ``[n_rank, D]`` rows (rank order); a collective every rank must enter.

    A rank that saw no fit batch passes ``local=None`` and still takes part: the ranks first agree on ``D``
    and the dtype (one ``all_reduce_max`` of ``[D, -D, is_float64]``), then that rank sends an empty
    ``[0, D]`` tensor. Rows are gathered as float64 when any rank holds float64 rows (float32 upcasts
    exactly), else as float32. Outside a distributed run this returns ``local``.

    Args:
        local: ``[n, D]`` float32 or float64 rows of this rank, or ``None``.
        device: where a rank without rows creates its tensors (the detector's device; NCCL needs the GPU).
        who: the detector's name, for error messages.

    Raises:
        RuntimeError: on every rank, when no rank saw any row (no update, or only empty batches).
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
    if local is None:
        local = torch.empty(0, d_max, dtype=dtype, device=device)
    rows = all_gather_cat(local.to(dtype))
    if rows.shape[0] == 0:  # only empty batches: the same result, so the same error, on every rank
        raise RuntimeError(
            f"detector {who!r}: no ID training features on any rank (every fit batch was empty)"
        )
    return rows
