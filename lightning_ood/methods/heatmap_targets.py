"""Training targets of the heatmap decoder, computed once before training (Hornauer & Belagiannis, WACV 2023).

An ID image's target is itself. An auxiliary outlier's target is the ID training image, among those the frozen
classifier *predicts* as the outlier's predicted class, whose pooled penultimate feature is Euclidean-nearest
to the outlier's (exact, chunked: :mod:`~lightning_ood.methods.heatmap_search`).

Outliers reach the training step as images, without their row in the auxiliary set, so a target is looked up
by the outlier's content: the BLAKE2b digest of its uint8 pixels (:func:`pixel_keys`). Identical images have
identical features and predictions, hence the same target, so the lookup is exact. It needs the outliers not
to be augmented (``data.init_args.aux_transforms: []``): an augmented outlier is not among the precomputed ones
and the lookup fails with a message saying so.

Under DDP both passes of the frozen classifier (the ID training images, then every auxiliary outlier) are
sharded: each rank describes its share (an ``UnpaddedDistributedSampler`` loader: rank ``r`` of ``W`` holds
rows ``r, r + W, ...``). The ID training features stay where they were computed: the feature range is an
all-reduce of each share's min / max (:func:`feature_range`) and the target search runs every outlier against
each rank's share and merges the ``[M]`` best (distance, dataset index) pairs (:func:`outlier_targets`). Only
the outliers' pass is gathered to every rank (:func:`gather_described`; ``M x D`` float32 features, predicted
classes and 16-byte digests: 0.8 GB for M = 100k, D = 2048), and freed after the search but for the digests.
What every rank keeps (the training step may draw any outlier on any rank): one content key per outlier, the
``[M]`` target rows, and, only when HeatmapOOD caches the classifier's outputs
(``cache_classifier_outputs``, :func:`cache_outputs`), those on the ``N`` ID training images and the ``M``
outliers (:class:`OutputCache`, float32 ``(N + M) x (D + K)``, gathered; 16.8 GB at ImageNet-1K with ResNet-50
and M = 100k, which is why it is not cached there by default). The target *images* are not copied but read
from the ID training set when a batch asks for them (:func:`id_image_reader`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ood.contract import ModelOutputs
from lightning_ood.data.disjoint import array_digests
from lightning_ood.derived_state import fingerprint
from lightning_ood.distributed import (
    all_gather_cat,
    all_gather_objects,
    all_reduce_max,
    distributed_world,
    gathered_order,
)
from lightning_ood.methods.heatmap_search import sharded_nearest

#: Largest classifier-output cache that ``cache_classifier_outputs=None`` (auto) builds, in bytes (2 GiB).
CACHE_LIMIT_BYTES = 2 * 1024**3


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
    """Features ``[N, D]``, logits ``[N, K]`` (float32, CPU) and pixel digests of a pass over a set; ``predicted``
    ``[N]`` the predicted classes where the logits were not kept (``[N, 0]``, :func:`gather_described`)."""

    features: Tensor
    logits: Tensor
    keys: list[bytes]
    predicted: Tensor | None = None

    @property
    def classes(self) -> Tensor:
        """``[N]`` predicted classes."""
        if self.predicted is not None:
            return self.predicted
        if len(self.logits) == 0:
            return torch.zeros(0, dtype=torch.long)
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


def gather_described(mine: Described, logits: bool = True, device: torch.device | None = None) -> Described:
    """Every rank's :class:`Described` share of a sharded pass (an ``UnpaddedDistributedSampler`` loader: rank
    ``r`` of ``W`` described rows ``r, r + W, ...``), put together in dataset order; a collective. Exchanged: the
    ``[N, D]`` features, the ``[N, K]`` logits (``logits=False``: only the ``[N]`` predicted classes, the result's
    logits ``[N, 0]``) and the 16-byte digests, through ``device`` (NCCL needs the GPU; the result is on the CPU).
    One process: ``mine`` (its logits dropped when ``logits=False``)."""
    _, world = distributed_world()
    if world == 1:
        if logits:
            return mine
        return Described(mine.features, mine.logits[:, :0], mine.keys, mine.classes)
    parts = all_gather_objects(
        (len(mine.features), mine.features.shape[1:], mine.logits.shape[1:], mine.keys)
    )
    keys = [key for *_, part in parts for key in part]
    # a rank that described nothing holds [0, 0]: it takes the others' widths so the shares concatenate
    widths = next(((f, g) for n, f, g, _ in parts if n), (mine.features.shape[1:], mine.logits.shape[1:]))

    def gather(t: Tensor) -> Tensor:
        return all_gather_cat(t.to(device)).cpu()

    features = gather(mine.features.reshape(len(mine.features), *widths[0]))
    in_order = _dataset_rows(len(features), world)
    if logits:
        scores = gather(mine.logits.reshape(len(mine.logits), *widths[1]))[in_order]
        classes = None
    else:
        classes = gather(mine.classes)[in_order]
        scores = torch.zeros(len(features), 0)
    return Described(features[in_order], scores, [keys[i] for i in in_order.tolist()], classes)


def share_rows(n: int, n_mine: int) -> Tensor:
    """``[n_mine]`` the dataset rows of this rank's share of a sharded pass over ``n`` images (rank ``r`` of
    ``W``: ``r, r + W, ...``); fails when the share does not have that size (a loader that is not sharded so)."""
    rank, world = distributed_world()
    rows = torch.arange(rank, n, world)
    if len(rows) != n_mine:
        raise RuntimeError(
            f"HeatmapOOD targets: rank {rank} of {world} described {n_mine} of {n} ID training images, expected "
            f"{len(rows)} (rows {rank}, {rank} + {world}, ...); the datamodule's fit_dataloader() must deal the "
            "images with an UnpaddedDistributedSampler, not shuffled"
        )
    return rows


def feature_range(mine: Described, device: torch.device | None = None) -> tuple[float, float]:
    """``(min, max)`` of every rank's ID training features (one ``all_reduce`` of two numbers; a rank without
    images contributes nothing); a collective."""
    if mine.features.numel():
        here = torch.tensor([-float(mine.features.min()), float(mine.features.max())], dtype=torch.float64)
    else:
        here = torch.full((2,), -float("inf"), dtype=torch.float64)
    neg_low, high = all_reduce_max(here.to(device)).tolist()
    if high == -float("inf"):
        raise RuntimeError(
            "HeatmapOOD: no ID training image on any rank; the ID training split must not be empty"
        )
    return -neg_low, high


def cache_outputs(option: bool | None, n: int, m: int, dim: int, classes: int) -> bool:
    """Whether to cache the classifier's outputs on the ``n`` ID training images and ``m`` outliers:
    ``option`` if given, else (``None``, auto) when ``(n + m) (dim + classes) 4`` bytes, the float32 cache on
    every rank, is at most :data:`CACHE_LIMIT_BYTES`; logs one line (rank 0) when auto decides not to."""
    size = (n + m) * (dim + classes) * 4
    if option is not None:
        return bool(option)
    if size <= CACHE_LIMIT_BYTES:
        return True
    rank_zero_info(
        f"HeatmapOOD: not caching the classifier's outputs: ({n} ID training images + {m} outliers) x ({dim} "
        f"features + {classes} logits) x 4 B = {size / 1e9:.1f} GB per rank exceeds the "
        f"{CACHE_LIMIT_BYTES / 1e9:.1f} GB limit; training runs the frozen classifier on every batch "
        "(model.init_args.cache_classifier_outputs=true caches anyway)"
    )
    return False


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
    id_share: Described,
    id_rows: Tensor,
    outliers: Described,
    read_images: Callable[[Tensor], Tensor],
    chunk_size: int = 8192,
    device: torch.device | None = None,
) -> OutlierTargets:
    """Targets of ``outliers`` (every rank's, in dataset order) among the ID training images, of which this rank
    holds ``id_share`` (features and predictions; ``id_rows`` ``[n]`` their dataset rows). Each rank searches
    every outlier in its share and the ranks merge by (distance, dataset row)
    (:func:`~lightning_ood.methods.heatmap_search.sharded_nearest`): the same rows as one process, no ID
    features exchanged; ``device`` carries the collectives (NCCL needs the GPU). ``read_images``: ID training
    rows -> uint8 images. A collective."""
    features = id_share.features
    if len(features) == 0:  # a rank without ID images holds [0, 0]
        features = torch.zeros(0, outliers.features.shape[1])
    rows = sharded_nearest(
        outliers.features, outliers.classes, features, id_share.classes, id_rows, chunk_size, device
    )
    index = {key: i for i, key in enumerate(outliers.keys)}  # duplicates share features, hence the target
    return OutlierTargets(rows=rows, index=index, read=read_images)
