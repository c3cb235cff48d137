"""Training targets of the heatmap decoder, computed once before training (Hornauer & Belagiannis, WACV 2023).

An ID image's target is itself. An auxiliary outlier's target is the ID training image, among those the frozen
classifier *predicts* as the outlier's predicted class, whose pooled penultimate feature is Euclidean-nearest
to the outlier's (exact, chunked search: :func:`~lightning_ood.detectors.knn.nearest_euclidean`).

Outliers reach the training step as images, without their row in the auxiliary set, so a target is looked up
by the outlier's content: the BLAKE2b digest of its uint8 pixels (:func:`pixel_keys`). Identical images have
identical features and predictions, hence the same target, so the lookup is exact. It needs the outliers not
to be augmented (``data.init_args.aux_transforms: []``): an augmented outlier is not among the precomputed ones
and the lookup fails with a message saying so.

Under DDP both passes of the frozen classifier (the ID training images, then every auxiliary outlier) are
sharded: each rank describes its share (an ``UnpaddedDistributedSampler`` loader) and :func:`gather_described`
puts the shares together in dataset order, and each rank searches the targets of its share of the outliers
(:func:`outlier_targets`), the ``[M]`` target rows then gathered the same way. What every rank keeps (the
training step may draw any outlier on any rank): the classifier's outputs on the ``N`` ID training images and
the ``M`` outliers (:class:`OutputCache`, float32 ``(N + M) x (D + K)``), one content key per image, and the
``[M]`` target rows; the target *images* are not copied but read from the ID training set when a batch asks
for them (:func:`id_image_reader`). At ImageNet-1K scale (N = 1.28M, ResNet-50: D = 2048, K = 1000) with
M = 100k outliers that is about 16.8 GB of cached outputs and ~0.2 GB of keys per rank, whatever the number of
ranks (the cache is built by concatenating the two passes, so about twice that at its peak); the 224 px target
images, kept before, would have added 15 GB per rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ood.contract import ModelOutputs
from lightning_ood.data.disjoint import array_digests
from lightning_ood.derived_state import fingerprint
from lightning_ood.detectors.knn import nearest_euclidean
from lightning_ood.distributed import all_gather_cat, all_gather_objects, distributed_world, gathered_order


def targets_fingerprint(method: Any) -> str:
    """What the feature range, the output cache and the outlier targets are computed from: the frozen
    classifier's weights, the ID fit data, the auxiliary set, the normalisation and the precision
    (``lightning_ood.derived_state``): training again with all of them unchanged reuses them."""
    dm = method.trainer.datamodule
    aux = {"aux_set": repr(dm.aux_set), "seed": dm.seed}
    classifier = method._frozen[
        "classifier"
    ]  # its file's path and SHA-256 (the decoder's weights do not count)
    return fingerprint(classifier=classifier, data=dm.fit_fingerprint(), aux=aux,
                       pixels=[method.pixel_mean.tolist(), method.pixel_std.tolist()],
                       precision=str(method.trainer.precision))  # fmt: skip


def pixel_keys(images: Tensor, mean: Tensor, std: Tensor) -> list[bytes]:
    """One digest per normalised ``[B, C, S, S]`` image: of its uint8 pixels ``round(255 (x * std + mean))``.

    Rounding recovers the exact uint8 pixels the batch was normalised from (also from half precision), so a
    batch gives the same keys on any device and in any precision.
    """
    pixels = images.detach().float().cpu() * std.cpu().view(1, -1, 1, 1) + mean.cpu().view(1, -1, 1, 1)
    return array_digests(pixels.mul(255).round().clamp(0, 255).to(torch.uint8))


def same_class_nearest(
    queries: Tensor,
    query_classes: Tensor,
    bank: Tensor,
    bank_classes: Tensor,
    chunk_size: int = 8192,
    warn: bool = True,
) -> Tensor:
    """For every query, the row of the Euclidean-nearest ``bank`` row of the same class; ``[Q]`` long.

    Args:
        queries: ``[Q, D]`` outlier features; query_classes: ``[Q]`` their predicted classes.
        bank: ``[N, D]`` ID training features; bank_classes: ``[N]`` their predicted classes.
        chunk_size: bank rows per chunk of the exact search.
        warn: warn (on rank 0) about classes without candidates (below).

    A class that no ID training image is predicted as (a weak classifier) has no candidates: its outliers fall
    back to the nearest ID training image of any class, with a warning.
    """
    rows = torch.empty(len(queries), dtype=torch.long)
    orphans = []
    for c in query_classes.unique().tolist():
        picked = (query_classes == c).nonzero().squeeze(1)
        candidates = (bank_classes == c).nonzero().squeeze(1)
        if len(candidates) == 0:
            orphans.append(c)
            candidates = torch.arange(len(bank))
        nearest = nearest_euclidean(queries[picked], bank[candidates], chunk_size)
        rows[picked] = candidates[nearest.cpu()]
    if orphans and warn:
        _warn_orphans(orphans)
    return rows


def _warn_orphans(orphans: list[int]) -> None:
    rank_zero_warn(
        f"HeatmapOOD targets: no ID training image is predicted as class(es) {orphans}; their outliers get the "
        "nearest ID training image of any class as target"
    )


@dataclass
class OutlierTargets:
    """Precomputed outlier targets: ``rows`` ``[M]`` the target's row in the ID training set of each outlier,
    ``index`` outlier digest -> its position in ``rows``, ``read`` ID training rows ``[B]`` -> their uint8
    images ``[B, C, S, S]`` (:func:`id_image_reader`: the images are read when asked for, not kept)."""

    rows: Tensor
    index: dict[bytes, int]
    read: Callable[[Tensor], Tensor]

    def lookup(self, keys: list[bytes]) -> Tensor:
        """The uint8 target images of outliers with these digests, ``[B, C, S, S]``."""
        try:
            picks = [self.index[k] for k in keys]
        except KeyError:
            raise RuntimeError(
                "HeatmapOOD: an outlier in the batch is not among the auxiliary outliers whose targets were "
                "precomputed. Targets are computed for the outliers as stored, so they must not be augmented: set "
                "data.init_args.aux_transforms: [] (or train_transforms: [], which aux_transforms follows)"
            ) from None
        return self.read(self.rows[picks])


def id_image_reader(images: Tensor | Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """``rows [B] -> uint8 [B, C, S, S]`` of the ID training ``images`` (not augmented): indexing when they are
    held in memory (no copy of the set), else the ``B`` files decoded by a pool of threads (PIL releases the
    GIL), per training batch, so no rank keeps ``M`` decoded target images."""
    if isinstance(images, Tensor):
        return lambda rows: images[rows]
    threads = min(8, os.cpu_count() or 1)

    def read(rows: Tensor) -> Tensor:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return torch.stack(list(pool.map(images.__getitem__, rows.tolist())))

    return read


@dataclass
class Described:
    """Features ``[N, D]``, logits ``[N, K]`` (float32, CPU) and pixel digests of a pass over a set."""

    features: Tensor
    logits: Tensor
    keys: list[bytes]

    @property
    def classes(self) -> Tensor:
        """``[N]`` predicted classes."""
        return self.logits.argmax(dim=1)


def describe(
    batches: Iterable[tuple[Tensor, Tensor]],
    forward: Callable[[Tensor], ModelOutputs],
    keys: Callable[[Tensor], list[bytes]] | None,
    what: str,
    progress: bool,
) -> Described:
    """One pass of the frozen classifier over ``batches`` (``forward``: normalised images -> outputs)."""
    features, logits, digests = [], [], []
    for images, _ in tqdm(batches, desc=f"HeatmapOOD targets: {what}", disable=not progress, leave=False):
        with torch.no_grad():
            out = forward(images)
        features.append(out.features.detach().float().cpu())
        logits.append(out.logits.detach().float().cpu())
        if keys is not None:
            digests += keys(images)
    if not features:  # a rank without a share of a set smaller than the number of ranks
        return Described(torch.empty(0, 0), torch.empty(0, 0), digests)
    return Described(torch.cat(features), torch.cat(logits), digests)


def _dataset_rows(n: int, world: int) -> Tensor:
    """``[n]``: for each dataset row, its row among ``n`` rows gathered in rank order from an
    ``UnpaddedDistributedSampler`` split (rank ``r`` of ``W`` holds rows ``r, r + W, ...``)."""
    order = torch.from_numpy(gathered_order(n, world))  # the dataset row of each gathered row
    in_order = torch.empty_like(order)
    in_order[order] = torch.arange(len(order))
    return in_order


def gather_described(mine: Described) -> Described:
    """Every rank's :class:`Described` share of a sharded pass (an ``UnpaddedDistributedSampler`` loader: rank
    ``r`` of ``W`` described rows ``r, r + W, ...``), put together in dataset order; a collective. So a pass
    over the ID training images or the outliers costs each rank ``1 / W`` of the forward passes; only the
    ``[N, D]`` features, logits and 16-byte digests are exchanged. One process: ``mine``."""
    _, world = distributed_world()
    if world == 1:
        return mine
    parts = all_gather_objects(
        (len(mine.features), mine.features.shape[1:], mine.logits.shape[1:], mine.keys)
    )
    keys = [key for *_, part in parts for key in part]
    # a rank that described nothing holds [0, 0]: it takes the others' widths so the shares concatenate
    widths = next(((f, g) for n, f, g, _ in parts if n), (mine.features.shape[1:], mine.logits.shape[1:]))
    features = all_gather_cat(mine.features.reshape(len(mine.features), *widths[0]))
    logits = all_gather_cat(mine.logits.reshape(len(mine.logits), *widths[1]))
    in_order = _dataset_rows(len(features), world)
    return Described(features[in_order], logits[in_order], [keys[i] for i in in_order.tolist()])


def gather_rows(mine: Tensor) -> Tensor:
    """Every rank's share (rows ``r, r + W, ...``) of a per-row result ``[n_r, ...]``, in dataset order
    (``[n, ...]``); a collective, as :func:`gather_described`. One process: ``mine``."""
    _, world = distributed_world()
    if world == 1:
        return mine
    gathered = all_gather_cat(mine)
    return gathered[_dataset_rows(len(gathered), world)]


@dataclass
class OutputCache:
    """The frozen classifier's outputs on the training images, keyed by pixel digest: without augmentation they
    never change, so training looks them up instead of running the classifier again on every batch."""

    features: Tensor
    logits: Tensor
    index: dict[bytes, int]

    @classmethod
    def of(cls, *passes: Described) -> OutputCache:
        keys = [k for p in passes for k in p.keys]
        return cls(
            features=torch.cat([p.features for p in passes]),
            logits=torch.cat([p.logits for p in passes]),
            index={key: i for i, key in enumerate(keys)},
        )

    def get(self, keys: list[bytes]) -> ModelOutputs | None:
        """The classifier's ``ModelOutputs(logits [B, K], features [B, D])`` on these images (CPU), or ``None``
        if one of them is not cached."""
        rows = [self.index.get(k) for k in keys]
        if any(r is None for r in rows):
            return None
        return ModelOutputs(logits=self.logits[rows], features=self.features[rows])


def outlier_targets(
    id_train: Described,
    outliers: Described,
    read_images: Callable[[Tensor], Tensor],
    chunk_size: int = 8192,
) -> OutlierTargets:
    """Targets of ``outliers`` among the ``id_train`` images (both every rank's, in dataset order;
    ``read_images``: ID training rows -> uint8 images). Under DDP each rank searches its share of the outliers
    (rows ``r, r + W, ...``) and the target rows are gathered (:func:`gather_rows`): the same rows as one process,
    ``1 / W`` of the search per rank. A collective."""
    rank, world = distributed_world()
    orphans = sorted(set(outliers.classes.unique().tolist()) - set(id_train.classes.unique().tolist()))
    if orphans:
        _warn_orphans(orphans)
    share = slice(rank, None, world)
    mine = same_class_nearest(
        outliers.features[share],
        outliers.classes[share],
        id_train.features,
        id_train.classes,
        chunk_size,
        warn=False,
    )
    index = {key: i for i, key in enumerate(outliers.keys)}  # duplicates share features, hence the target
    return OutlierTargets(rows=gather_rows(mine), index=index, read=read_images)
