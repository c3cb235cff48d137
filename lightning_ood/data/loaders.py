"""How the DataModule's loaders are built: shuffled for training, sample-exact for evaluation, cycling outliers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ood.data.datasets import derived_rng
from lightning_ood.data.samplers import CyclingDistributedSampler, UnpaddedDistributedSampler
from lightning_ood.data.transforms import NormalizeCollate
from lightning_ood.distributed import distributed_world


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

    def unpadded(self, dataset: Dataset) -> DataLoader:
        """Sample-exact under DDP: every image goes to exactly one rank, none is repeated as padding."""
        rank, world = distributed_world()
        sampler = UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank) if world > 1 else None
        return self.plain(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)

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
