"""Training targets of the heatmap decoder, computed once before training (Hornauer & Belagiannis, WACV 2023).

An ID image's target is itself. An auxiliary outlier's target is the ID training image, among those the frozen
classifier *predicts* as the outlier's predicted class, whose pooled penultimate feature is Euclidean-nearest
to the outlier's (exact, chunked search: :func:`~lightning_ood.detectors.knn.nearest_euclidean`).

Outliers reach the training step as images, without their row in the auxiliary set, so a target is looked up
by the outlier's content: the BLAKE2b digest of its uint8 pixels (:func:`pixel_keys`). Identical images have
identical features and predictions, hence the same target, so the lookup is exact. It needs the outliers not
to be augmented (``data.init_args.aux_transforms: []``): an augmented outlier is not among the precomputed ones
and the lookup fails with a message saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ood.contract import ModelOutputs
from lightning_ood.data.disjoint import image_digests
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
    return image_digests(pixels.mul(255).round().clamp(0, 255).to(torch.uint8))


def same_class_nearest(
    queries: Tensor, query_classes: Tensor, bank: Tensor, bank_classes: Tensor, chunk_size: int = 8192
) -> Tensor:
    """For every query, the row of the Euclidean-nearest ``bank`` row of the same class; ``[Q]`` long.

    Args:
        queries: ``[Q, D]`` outlier features; query_classes: ``[Q]`` their predicted classes.
        bank: ``[N, D]`` ID training features; bank_classes: ``[N]`` their predicted classes.
        chunk_size: bank rows per chunk of the exact search.

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
    if orphans:
        rank_zero_warn(
            f"HeatmapOOD targets: no ID training image is predicted as class(es) {orphans}; their outliers get the "
            "nearest ID training image of any class as target"
        )
    return rows


@dataclass
class OutlierTargets:
    """Precomputed outlier targets: ``images`` uint8 ``[M, C, S, S]`` (the chosen ID training images), ``rows``
    ``[M]`` their rows in the ID training set, ``index`` outlier digest -> row of ``images``."""

    images: Tensor
    rows: Tensor
    index: dict[bytes, int]

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
        return self.images[picks]


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
    return Described(torch.cat(features), torch.cat(logits), digests)


def gather_described(mine: Described) -> Described:
    """Every rank's :class:`Described` share of a sharded pass (an ``UnpaddedDistributedSampler`` loader: rank
    ``r`` of ``W`` described rows ``r, r + W, ...``), put together in dataset order; a collective. So the pass
    over the ID training images costs each rank ``1 / W`` of the forward passes; only the ``[N, D]`` features,
    logits and 16-byte digests are exchanged. One process: ``mine``."""
    _, world = distributed_world()
    if world == 1:
        return mine
    features, logits = all_gather_cat(mine.features), all_gather_cat(mine.logits)
    keys = [key for part in all_gather_objects(mine.keys) for key in part]
    order = torch.from_numpy(gathered_order(len(features), world))  # the dataset row of each gathered row
    in_order = torch.empty_like(order)
    in_order[order] = torch.arange(len(order))
    return Described(features[in_order], logits[in_order], [keys[i] for i in in_order.tolist()])


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
    id_train: Described, outliers: Described, id_images: Callable[[Tensor], Tensor], chunk_size: int = 8192
) -> OutlierTargets:
    """Targets of ``outliers`` among the ``id_train`` images (``id_images``: rows -> uint8 images)."""
    rows = same_class_nearest(
        outliers.features, outliers.classes, id_train.features, id_train.classes, chunk_size
    )
    index = {key: i for i, key in enumerate(outliers.keys)}  # duplicates share features, hence the target
    return OutlierTargets(images=id_images(rows), rows=rows, index=index)
