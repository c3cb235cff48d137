"""HeatmapOOD's target search (Hornauer & Belagiannis, WACV 2023): for every auxiliary outlier, the ID training
image whose pooled penultimate feature is Euclidean-nearest among those the frozen classifier predicts as the
outlier's predicted class (a class no ID training image is predicted as: the nearest of any class).

Under DDP the ID training features are never gathered: each rank searches every outlier against its own share of
the ID rows (exact, float64, chunked: :func:`~lightning_ood.detectors.knn_search.nearest_euclidean_distances`)
and the ranks merge their ``[M]`` best ``(distance, dataset index)`` pairs with one all-gather
(:func:`merge_nearest`): the least distance, ties to the lowest dataset index, which is what one process's
search over every row returns (:func:`~lightning_ood.detectors.knn_search.nearest_euclidean` keeps the lowest
index of equal distances). The ``M x D`` outlier features are every rank's (gathered by the caller).

Equal to one process for equal distances: a pair's float64 distance ``||q||^2 - 2 q.b + ||b||^2`` is formed
alike on any share, but the dot product's last-bit rounding may follow the BLAS blocking of a block, which can
only matter for two ID rows equally near an outlier up to ~1e-16 relative (integer-valued features, as in the
tests, are exact).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_ood.detectors.knn_search import nearest_euclidean_distances
from lightning_ood.distributed import all_gather_stack, all_reduce_max

#: Dataset index of "no candidate on this rank" (distance ``inf``); exact in float64, above any dataset index.
NO_ROW = 2**53


def nearest_in_share(
    queries: Tensor,
    query_classes: Tensor,
    bank: Tensor,
    bank_classes: Tensor,
    bank_rows: Tensor,
    present: Tensor,
    chunk_size: int = 8192,
) -> tuple[Tensor, Tensor]:
    """Each query's nearest same-class row in one share of the ID bank: ``([Q] float64 squared distance,
    [Q] long dataset index)``, ``(inf, NO_ROW)`` where the share holds no candidate.

    Args:
        queries: ``[Q, D]`` outlier features; query_classes: ``[Q]`` their predicted classes.
        bank: ``[n, D]`` this share's ID training features (``n`` may be 0); bank_classes: ``[n]`` their
            predicted classes; bank_rows: ``[n]`` their dataset indices, ascending (the first of equally near
            rows is kept, so it is the lowest index).
        present: the classes that some ID training image (on any rank) is predicted as; a query class that is
            not among them searches every row of the share.
        chunk_size: bank rows, and queries, per block: peak extra memory about ``3 chunk_size^2`` float64.
    """
    distance = torch.full((len(queries),), float("inf"), dtype=torch.float64)
    index = torch.full((len(queries),), NO_ROW, dtype=torch.long)
    for c in query_classes.unique().tolist():
        picked = (query_classes == c).nonzero().squeeze(1)
        same = (
            bank_classes == c
            if bool((present == c).any())
            else torch.ones_like(bank_classes, dtype=torch.bool)
        )
        candidates = same.nonzero().squeeze(1)
        if len(candidates) == 0:
            continue
        for start in range(0, len(picked), chunk_size):  # query blocks: one class may hold most outliers
            block = picked[start : start + chunk_size]
            d, where = nearest_euclidean_distances(queries[block], bank[candidates], chunk_size)
            distance[block] = d.cpu()
            index[block] = bank_rows[candidates[where.cpu()]]
    return distance, index


def merge_nearest(distances: Tensor, indices: Tensor) -> Tensor:
    """``[Q]`` the dataset index with the least distance over the shares, ties to the lowest index.

    Args:
        distances: ``[W, Q]`` each share's best distance per query; indices: ``[W, Q]`` its dataset index.

    Raises:
        RuntimeError: when a query has no candidate in any share.
    """
    least = distances.min(dim=0).values  # [Q]
    tied = torch.where(distances == least, indices, torch.full_like(indices, NO_ROW))
    merged = tied.min(dim=0).values
    if bool((merged == NO_ROW).any()):
        raise RuntimeError("HeatmapOOD targets: an outlier found no ID training image on any rank")
    return merged


def sharded_nearest(
    queries: Tensor,
    query_classes: Tensor,
    bank: Tensor,
    bank_classes: Tensor,
    bank_rows: Tensor,
    chunk_size: int = 8192,
    device: torch.device | None = None,
) -> Tensor:
    """``[Q]`` dataset index of each query's target (module doc), the bank sharded over the ranks; a collective.

    Args:
        queries, query_classes: ``[Q, D]``, ``[Q]``, the same on every rank (every outlier).
        bank, bank_classes, bank_rows: this rank's share of the ID training features ``[n, D]``, their predicted
            classes and dataset indices ``[n]`` (ascending; ``n`` may be 0 on some ranks).
        chunk_size: as :func:`nearest_in_share`.
        device: where the collectives' tensors live (NCCL needs the GPU); CPU by default.

    Two collectives of ``[Q]``-sized tensors: which query classes any rank's ID rows are predicted as (one
    ``all_reduce``), and the ``[W, 2, Q]`` float64 ``(distance, index)`` pairs (one ``all_gather``). One process:
    the search over ``bank``.
    """
    classes = query_classes.unique()
    here = torch.isin(classes, bank_classes).long().to(device)
    present = classes[all_reduce_max(here).cpu().bool()]
    orphans = sorted(set(classes.tolist()) - set(present.tolist()))
    if orphans:
        warn_orphans(orphans)
    distance, index = nearest_in_share(
        queries, query_classes, bank, bank_classes, bank_rows, present, chunk_size
    )
    pairs = all_gather_stack(torch.stack([distance, index.double()]).to(device)).cpu()  # [W, 2, Q]
    return merge_nearest(pairs[:, 0], pairs[:, 1].long())


def same_class_nearest(
    queries: Tensor,
    query_classes: Tensor,
    bank: Tensor,
    bank_classes: Tensor,
    chunk_size: int = 8192,
    warn: bool = True,
) -> Tensor:
    """For every query, the row of the Euclidean-nearest ``bank`` row of the same class; ``[Q]`` long (one
    process, the whole bank; queries, bank and classes as :func:`nearest_in_share`).

    A class that no ID training image is predicted as (a weak classifier) has no candidates: its outliers fall
    back to the nearest ID training image of any class, with a warning (on rank 0) unless ``warn`` is False.
    """
    present = bank_classes.unique()
    orphans = sorted(set(query_classes.unique().tolist()) - set(present.tolist()))
    if orphans and warn:
        warn_orphans(orphans)
    rows = torch.arange(len(bank))
    _, index = nearest_in_share(queries, query_classes, bank, bank_classes, rows, present, chunk_size)
    if bool((index == NO_ROW).any()):
        raise ValueError("same_class_nearest needs a non-empty bank")
    return index


def warn_orphans(orphans: list[int]) -> None:
    rank_zero_warn(
        f"HeatmapOOD targets: no ID training image is predicted as class(es) {orphans}; their outliers get the "
        "nearest ID training image of any class as target"
    )
