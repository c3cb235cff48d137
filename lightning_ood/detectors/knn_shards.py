"""k-NN scoring against a bank sharded over the ranks: one collective *round* per scored batch, a fixed number
of rounds agreed before scoring.

Under DDP each rank keeps only its share of the KNN bank (``N / W`` rows), so a query's ``k`` largest
similarities must be merged across ranks. A round: the ranks all-gather their (normalised) queries, each
computes the top ``k`` similarities of *every* query against its own shard, and the per-shard top-``k`` lists
are all-gathered so that each rank merges those of its own queries. Memory per round: ``W * Q * k`` values
(``Q`` queries over all ranks), never the bank.

Ranks score different numbers of batches (the unpadded test sampler gives a rank one sample more or less, and
a rank may have none), so a round per batch alone would leave a rank waiting in a collective the others never
enter. :meth:`ShardedRounds.begin` therefore agrees, before scoring, on the most batches any rank will score;
a rank with fewer owes the difference as empty rounds (no queries of its own, its shard still answers the
others'), which :func:`lightning_ood.detectors.base.begin_scoring` runs right away, one round of every
sharded detector at a time in the detectors' order (the order their real rounds take in each batch). A batch
scored without a forward pass (an empty DDP slot) runs an empty round instead (:meth:`Detector.empty_round`).
Every rank then makes the same round calls, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ood.distributed import all_reduce_max, distributed_world

#: ``(queries [Q, D], k) -> [Q, k]`` the ``k`` largest similarities of each query in this rank's shard, padded
#: with ``-inf`` where the shard has fewer than ``k`` rows.
LocalTopK = Callable[[Tensor, int], Tensor]


def _all_gather_padded(tensor: Tensor, sizes: list[int]) -> list[Tensor]:
    """Every rank's ``[sizes[r], ...]`` tensor (the sizes known to all ranks), padded to the largest for the
    all-gather and trimmed back."""
    most = max(sizes)
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:size] for part, size in zip(parts, sizes, strict=True)]


class ShardedRounds:
    """The agreed rounds of one scoring pass of a sharded KNN detector (see the module doc).

    Args:
        dim: the feature dimension ``D`` (agreed at fit time, also on a rank whose shard is empty).
        device: where an empty round's tensors live (the bank's device).
        who: the detector's name, for error messages.
    """

    def __init__(self, dim: int, device: torch.device, who: str) -> None:
        self.dim, self.device, self.who = dim, device, who
        self.left: int | None = None  # rounds this rank may still run; None: begin() not called

    def begin(self, num_batches: int | float | None) -> int:
        """Agree on the number of rounds of the coming pass; returns the empty rounds this rank owes (its
        caller runs them with :meth:`kth` ``(None, ...)`` before the first scored batch).

        A collective every rank must enter, after the fit and before its first scored batch. ``num_batches``:
        the batches this rank will score in the pass (every test dataloader together).
        """
        if num_batches is None or num_batches == float("inf"):
            raise ValueError(
                f"detector {self.who!r} keeps its k-NN bank sharded over the ranks and scores with one collective "
                "per batch, so every rank must know how many batches it will score; the test loaders have no "
                "length. Use sized loaders, or KNN(bank_placement='replicated')"
            )
        mine = int(num_batches)
        most = int(all_reduce_max(torch.tensor([mine], dtype=torch.long, device=self.device)).item())
        self.left = most
        return most - mine

    def topk(self, queries: Tensor | None, local_topk: LocalTopK, k: int) -> Tensor:
        """``[B, k]`` the ``k`` largest similarities (descending; ``-inf`` where the whole bank has fewer than
        ``k`` rows) of each of this rank's ``queries`` ``[B, D]`` over the whole (sharded) bank; ``None`` runs
        an empty round. A collective: one call per round on every rank."""
        if self.left is None or self.left <= 0:
            raise RuntimeError(
                f"detector {self.who!r} keeps its bank sharded over the ranks: every rank must announce its "
                "number of scored batches first (Detector.begin_scoring, which the methods call when testing and "
                "predicting start, and the detector search before each pass); scoring more batches than announced "
                "would leave the other ranks waiting"
            )
        self.left -= 1
        rank, _ = distributed_world()
        n = 0 if queries is None else queries.shape[0]
        wide = queries is not None and queries.dtype == torch.float64
        meta = torch.tensor([n, int(wide)], dtype=torch.long, device=self.device)
        metas = [torch.empty_like(meta) for _ in range(dist.get_world_size())]
        dist.all_gather(metas, meta)
        sizes = [int(m[0]) for m in metas]
        dtype = torch.float64 if any(int(m[1]) for m in metas) else torch.float32
        if queries is None:
            queries = torch.empty(0, self.dim, dtype=dtype, device=self.device)
        if sum(sizes) == 0:
            return queries.new_empty(0, k)
        everyone = torch.cat(_all_gather_padded(queries.to(self.device, dtype), sizes))  # [Q, D]
        top = local_topk(everyone, k).to(dtype)  # [Q, k] against this rank's shard
        start = sum(sizes[:rank])
        # The shards' top-k lists of every query; each rank keeps those of its own queries.
        lists = _all_gather_padded_full(top)  # [W, Q, k]
        mine = lists[:, start : start + n].permute(1, 0, 2).reshape(n, len(sizes) * k)  # [B, W * k]
        return mine.topk(k, dim=1).values.to(queries.dtype)

    def kth(self, queries: Tensor | None, local_topk: LocalTopK, k: int) -> Tensor:
        """``[B]`` the k-th largest similarity of each query over the whole bank (see :meth:`topk`)."""
        return self.topk(queries, local_topk, k)[:, -1]


def _all_gather_padded_full(tensor: Tensor) -> Tensor:
    """``[W, *shape]``: the same-shape ``tensor`` of every rank, stacked in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def pad_topk(values: Tensor, k: int) -> Tensor:
    """``[Q, k]``: ``values`` ``[Q, m]`` (``m <= k``) padded on the right with ``-inf``."""
    if values.shape[1] >= k:
        return values
    pad = values.new_full((values.shape[0], k - values.shape[1]), float("-inf"))
    return torch.cat([values, pad], dim=1)
