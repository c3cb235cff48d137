"""Samplers: sample-exact distributed evaluation (README, Conventions), and outliers cycled beside ID data."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

from lightning_ood.distributed import distributed_world

__all__ = ["EMPTY_SLOT", "CyclingDistributedSampler", "UnpaddedDistributedSampler", "distributed_world"]


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``W`` gets indices ``r, r + W, r + 2W, ...``: every index exactly once over all ranks.

    Unlike :class:`~torch.utils.data.DistributedSampler` it neither pads with duplicates nor drops samples, so
    ranks may get one sample more or less than each other. It subclasses ``DistributedSampler`` so that
    Lightning keeps it instead of inserting its own padded sampler. Never shuffles; ``set_epoch`` is a no-op.

    ``empty_slot``: a rank with no index yields :data:`EMPTY_SLOT` once (a loader turns it into an empty batch),
    so that Lightning runs its test / predict loop, with every hook and collective, instead of skipping it.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        empty_slot: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)  # type: ignore[arg-type]
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))
        self.empty_slot = empty_slot and self.num_samples == 0

    def __iter__(self) -> Iterator[int]:
        return iter([EMPTY_SLOT] if self.empty_slot else range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return 1 if self.empty_slot else self.num_samples


#: The index an :class:`UnpaddedDistributedSampler` with ``empty_slot`` yields on a rank without samples.
EMPTY_SLOT = -1


class CyclingDistributedSampler(DistributedSampler):
    """Draws ``num_samples`` indices per rank from a dataset cycled in fresh seeded permutations.

    For auxiliary outliers next to the ID training data: the ID loader defines the epoch, and the outlier set,
    smaller or larger, is repeated (each pass a new permutation) or cut so that every rank gets exactly
    ``num_samples`` of them. The global stream of indices is the same on every rank; rank ``r`` of ``W`` takes
    positions ``r, r + W, ...``, so ranks see disjoint draws. ``set_epoch`` (called by Lightning) changes the
    permutations. A ``DistributedSampler`` subclass so that Lightning keeps it under DDP.
    """

    def __init__(
        self, dataset: Sized, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("CyclingDistributedSampler needs a non-empty dataset")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.num_samples = num_samples
        self.total_size = num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)  # type: ignore[arg-type]
        passes = -(-self.total_size // n)
        stream = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[: self.total_size]
        return iter(stream[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
