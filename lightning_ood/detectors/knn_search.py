"""Exact chunked searches over a bank of rows: the k largest cosines (KNN) and the Euclidean nearest row
(HeatmapOOD's targets). Peak extra memory is one ``[B, chunk]`` block, never ``B x N``."""

from __future__ import annotations

import torch
from torch import Tensor


def kth_largest_cosine(queries: Tensor, bank: Tensor, k: int, chunk_size: int) -> Tensor:
    """The k-th largest of ``queries @ bank.T`` per row, computed chunk by chunk over the bank.

    Args:
        queries: ``[B, D]`` float32 or float64 unit rows; the similarities are computed in their dtype.
        bank: ``[N, D]`` unit rows, any float dtype (cast to ``queries.dtype`` one chunk at a time).
        k: ``1 <= k <= N``.
        chunk_size: bank rows per chunk; peak extra memory is ``B * (chunk_size + 2k)`` values.

    Returns:
        ``[B]`` the k-th largest similarity of each query (exact, ties included).
    """
    if bank.shape[0] < k:
        raise ValueError(f"k={k} exceeds the bank size {bank.shape[0]}")
    # topk_cosines holds exactly the k largest: their minimum is the k-th largest
    return topk_cosines(queries, bank, k, chunk_size).amin(dim=1)


def topk_cosines(queries: Tensor, bank: Tensor, k: int, chunk_size: int) -> Tensor:
    """``[B, min(k, N)]`` the largest values of ``queries @ bank.T`` per row (in no order), chunk by chunk over
    the bank; ``[B, 0]`` for an empty bank (a rank's empty share). Arguments as :func:`kth_largest_cosine`."""
    if bank.shape[0] == 0:
        return queries.new_empty(queries.shape[0], 0)
    bank = bank.to(queries.device)
    rows = min(chunk_size, bank.shape[0])
    if k == 1:
        return _largest_cosine(queries, bank, rows)[:, None]
    # One reused [B, chunk] buffer: a fresh 10-100 MB allocation per chunk costs page faults on CPU.
    buf = queries.new_empty(queries.shape[0], rows)
    best: Tensor | None = None  # [B, <=k] the largest similarities seen so far
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start : start + chunk_size].to(queries.dtype)
        full = chunk.shape[0] == buf.shape[1]
        sims = torch.mm(queries, chunk.T, out=buf) if full else queries @ chunk.T  # [B, c]
        top = sims.topk(min(k, sims.shape[1]), dim=1, sorted=False).values
        if best is not None:  # merge two small [B, <=k] sets
            top = torch.cat([best, top], dim=1)
            top = top.topk(min(k, top.shape[1]), dim=1, sorted=False).values
        best = top
    assert best is not None
    return best


def _largest_cosine(queries: Tensor, bank: Tensor, rows: int) -> Tensor:
    """k = 1: ``[B]`` the largest of ``queries @ bank.T`` per row. Products are bank-major (``[rows, B]``, reduced
    over the bank rows, one reused buffer): on CPU they ran faster than ``[B, rows]`` products reduced along a
    row (docs/benchmarks.md, section 8); the same values up to the float rounding of the product."""
    transposed = queries.T.contiguous()  # [D, B]
    buf = queries.new_empty(rows, queries.shape[0])
    best: Tensor | None = None
    for start in range(0, bank.shape[0], rows):
        chunk = bank[start : start + rows].to(queries.dtype)
        sims = torch.mm(chunk, transposed, out=buf) if chunk.shape[0] == rows else chunk @ transposed
        top = sims.amax(dim=0)  # amax is much cheaper than topk
        best = top if best is None else torch.maximum(best, top)
    assert best is not None
    return best


def nearest_euclidean(queries: Tensor, bank: Tensor, chunk_size: int = 8192) -> Tensor:
    """Row index of the Euclidean-nearest ``bank`` row of every query, exact, chunk by chunk over the bank.

    Distances ``||q||^2 - 2 q.b + ||b||^2`` are computed in float64 (so the argmin is that of the exact distances
    up to float64 rounding); ties go to the lowest index. Peak extra memory: ``B * chunk_size`` float64 values.

    Args:
        queries: ``[B, D]``.
        bank: ``[N, D]``, ``N >= 1``, any float dtype and device (moved one chunk at a time to the queries').
        chunk_size: bank rows per chunk.

    Returns:
        ``[B]`` long indices into ``bank``.
    """
    return nearest_euclidean_distances(queries, bank, chunk_size)[1]


def nearest_euclidean_distances(
    queries: Tensor, bank: Tensor, chunk_size: int = 8192
) -> tuple[Tensor, Tensor]:
    """:func:`nearest_euclidean` with the distances: ``([B] float64 squared distance, [B] long index)`` of the
    nearest ``bank`` row of every query (a search over a share of the bank, merged across shares by HeatmapOOD's
    targets). Same arguments; ``N >= 1``."""
    if bank.shape[0] == 0:
        raise ValueError("nearest_euclidean needs a non-empty bank")
    q = queries.detach().double()
    q_sq = q.square().sum(dim=1, keepdim=True)
    best = torch.full((len(q),), float("inf"), dtype=torch.float64, device=q.device)
    index = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start : start + chunk_size].to(q.device, torch.float64)
        dist = q_sq - 2 * q @ chunk.T + chunk.square().sum(dim=1)  # [B, c]
        value, where = dist.min(dim=1)
        closer = value < best  # strict: an equal distance in a later chunk keeps the lower index
        best = torch.where(closer, value, best)
        index = torch.where(closer, where + start, index)
    return best, index
