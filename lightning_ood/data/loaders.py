"""How the DataModule's loaders are built: shuffled for training, sample-exact for evaluation, cycling outliers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_ood.data.datasets import derived_rng
from lightning_ood.data.samplers import EMPTY_SLOT, CyclingDistributedSampler, UnpaddedDistributedSampler
from lightning_ood.data.transforms import NormalizeCollate
from lightning_ood.distributed import distributed_world


class WithEmptySlot(Dataset):
    """``dataset`` whose index :data:`EMPTY_SLOT` is ``None`` (dropped by :class:`EmptyAwareCollate`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> object:
        return None if index == EMPTY_SLOT else self.dataset[index]


@dataclass(frozen=True)
class EmptyAwareCollate:
    """``collate`` of the samples that are not ``None``; none: ``[0, *shape]`` images and ``[0]`` targets."""

    collate: NormalizeCollate
    shape: tuple[int, ...]

    def __call__(self, samples: list) -> tuple[Tensor, Tensor]:
        samples = [s for s in samples if s is not None]
        if samples:
            return self.collate(samples)
        return torch.empty(0, *self.shape), torch.empty(0, dtype=torch.long)


def _sample_shape(dataset: Dataset) -> tuple[int, ...]:
    return tuple(dataset[0][0].shape) if len(dataset) else (1, 1, 1)  # type: ignore[arg-type, index]


@dataclass(frozen=True)
class LoaderFactory:
    """Loaders that normalise per batch (``collate``) with the DataModule's workers and seed."""

    collate: NormalizeCollate
    num_workers: int
    eval_batch_size: int
    seed: int

    def plain(self, dataset: Dataset, batch_size: int, **kwargs: object) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            **kwargs,  # type: ignore[arg-type]
        )

    def shuffled(self, dataset: Dataset, key: str, batch_size: int) -> DataLoader:
        """Shuffled with a generator seeded from ``seed`` and ``key`` (Lightning shards it under DDP)."""
        seed = int(derived_rng(self.seed, key).integers(2**62))
        return self.plain(dataset, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))

    def unpadded(self, dataset: Dataset, at_least_one_batch: bool = False) -> DataLoader:
        """Sample-exact under DDP: every image goes to exactly one rank, none is repeated as padding.

        ``at_least_one_batch``: a rank with no image gets one empty batch (``[0, C, S, S]`` images, ``[0]``
        targets), so Lightning's test / predict loop runs on it with every hook and collective."""
        rank, world = distributed_world()
        sampler = UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank) if world > 1 else None
        if sampler is None or not at_least_one_batch:
            return self.plain(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)
        sampler = UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank, empty_slot=True)
        return DataLoader(
            WithEmptySlot(dataset),
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=EmptyAwareCollate(self.collate, _sample_shape(dataset)),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def cycling(self, outliers: Dataset, batch_size: int, n_id: int, id_batch_size: int) -> DataLoader:
        """Outliers for as many batches per rank as an ID loader of ``n_id`` images in ``id_batch_size`` gives
        (Lightning's DistributedSampler pads ID data to ``ceil(n_id / W)`` per rank); the outlier set cycles."""
        rank, world = distributed_world()
        batches = math.ceil(math.ceil(n_id / world) / id_batch_size)
        seed = int(derived_rng(self.seed, "shuffle/outliers").integers(2**31))
        sampler = CyclingDistributedSampler(
            outliers, batches * batch_size, num_replicas=world, rank=rank, seed=seed
        )
        return self.plain(outliers, batch_size, sampler=sampler)
