"""A linear probe on standardised frozen features, scored by its maximum softmax probability.

Adaloglou et al. (TMLR 2024, arXiv 2303.05828, Sec. 3 and their ``linear_probing.py``): the ID training
features are standardised (per dimension, with the training mean and standard deviation), a linear layer is
trained on them with cross-entropy (Adam, learning rate ``1e-3 * batch / 256``, weight decay ``1e-3``, 100
epochs, a cosine schedule with a linear warm-up over the first 10 % of the steps), and a test image scores
``-max_c softmax(W (z - mu) / sigma + b)_c`` (MSP, Hendrycks & Gimpel, ICLR 2017). Pseudo-label probing (PLP)
trains it on a CLIP model's zero-shot predictions instead of the ground truth.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs, all_gather_cat
from lightning_ood.detectors.gather import gather_rows
from lightning_ood.distributed import broadcast, distributed_world, gathered_order

Labels = Literal["targets", "zero_shot"]


class ProbeWeights(NamedTuple):
    """A trained probe: ``logits = ((z - mean) / std) @ weight.T + bias``; ``mean``, ``std`` ``[D]``,
    ``weight`` ``[C, D]``, ``bias`` ``[C]``."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor


def warmup_cosine(step: int, total: int, warmup_fraction: float) -> float:
    """Learning-rate factor at ``step`` of ``total``: linear from 0 over the first ``warmup_fraction`` of the
    steps, then a cosine from 1 to 0 (the reference's ``cosine_scheduler_iter``)."""
    warmup = int(warmup_fraction * total)
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    warmup_fraction: float = 0.1,
    seed: int = 0,
) -> ProbeWeights:
    """Train a linear probe on standardised ``features`` ``[N, D]`` with ``labels`` ``[N]`` (deterministic).

    Standardisation uses the features' mean and (unbiased) standard deviation; a constant dimension gets
    ``std = 1``. The layer starts from PyTorch's default ``nn.Linear`` initialisation drawn from a generator
    seeded with ``seed``, which also shuffles every epoch. Adam with learning rate ``lr * batch_size / 256`` and
    L2 ``weight_decay`` on weight and bias, the learning rate set per step by :func:`warmup_cosine`. Runs on the
    features' device in float32 (at least); memory is the features plus ``O(C * D)``.
    """
    n = features.shape[0]
    if n == 0 or labels.shape != (n,):
        raise ValueError(
            f"the probe needs [N, D] features with [N] labels, got {tuple(features.shape)}, {labels.shape}"
        )
    x, mean, std = _standardised(features)
    gen = torch.Generator().manual_seed(seed)
    weight, bias = _initial_layer(num_classes, x.shape[1], gen, x)
    base_lr = lr * batch_size / 256
    optimizer = torch.optim.Adam([weight, bias], lr=base_lr, weight_decay=weight_decay)
    total, step = epochs * math.ceil(n / batch_size), 0
    labels = labels.to(x.device)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device)
            for start in range(0, n, batch_size):
                rows = order[start : start + batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = base_lr * warmup_cosine(step, total, warmup_fraction)
                loss = F.cross_entropy(x[rows] @ weight.T + bias, labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return ProbeWeights(mean, std, weight.detach(), bias.detach())


def _in_order(rows: Tensor, order: Tensor) -> Tensor:
    """``rows`` gathered in rank order, put back in dataset order (``order``: the dataset index of each row)."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def _standardised(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, mean, std)``: ``[N, D]`` features in float32 (float64 kept) standardised per dimension with their mean
    and unbiased standard deviation (``1`` for a constant dimension or a single sample)."""
    x = features.float() if features.dtype != torch.float64 else features
    mean = x.mean(dim=0)
    std = x.std(dim=0) if len(x) > 1 else torch.ones_like(mean)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std, mean, std


def _initial_layer(classes: int, dim: int, gen: torch.Generator, like: Tensor) -> tuple[Tensor, Tensor]:
    """``nn.Linear``'s default initialisation, ``U(-1/sqrt(D), 1/sqrt(D))``, drawn from ``gen`` (on the CPU, so
    the same on every device)."""
    bound = 1.0 / math.sqrt(dim)
    weight = (torch.rand(classes, dim, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(classes, generator=gen) * 2 - 1) * bound
    return weight.to(like).requires_grad_(), bias.to(like).requires_grad_()


class LinearProbe(Detector):
    """A linear probe trained at fit time on the standardised ID-train features; score = ``-max softmax``.

    Higher = more OOD; range ``[-1, -1/C]``. ``features``: ``[B, D]``; returns ``[B]``. See the module doc for
    the recipe (Adaloglou et al., TMLR 2024). Fitting keeps every ID-train feature in memory (``N * D * 4``
    bytes on the features' device, e.g. 50k x 1280 x 4 B = 256 MB; under DDP gathered on every rank), then
    trains in ``finalize``: ``epochs * ceil(N / batch_size)`` Adam steps of a ``[batch, D] x [D, C]`` product.
    Under DDP the gathered rows are put back in dataset order (the fit loader's rank interleaving undone), so
    the probe is the one-process probe, and rank 0's weights are broadcast so every rank scores with the same.

    A method that classifies with the probe (the frozen encoder) reports its ID test accuracy as ``id_acc``.

    Args:
        epochs, batch_size, weight_decay, warmup_fraction, seed: the training recipe (defaults: the paper's).
        lr: base learning rate for a batch of 256; the rate used is ``lr * batch_size / 256``.
        labels: ``"targets"``, the ground-truth classes; ``"zero_shot"``, the argmax of a CLIP method's zero-shot
            logits (pseudo-label probing, PLP; needs a method with ``zero_shot_logits``).
        name: log key; defaults to ``"linear_probe"``.
    """

    needs_fit = True

    def __init__(
        self,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        warmup_fraction: float = 0.1,
        labels: Labels = "targets",
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if labels not in ("targets", "zero_shot"):
            raise ValueError(f"LinearProbe labels must be 'targets' or 'zero_shot', got {labels!r}")
        if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0 or not 0 <= warmup_fraction < 1:
            raise ValueError(
                "LinearProbe: epochs and batch_size must be >= 1, lr > 0, weight_decay >= 0, warmup_fraction in "
                f"[0, 1); got {epochs}, {batch_size}, {lr}, {weight_decay}, {warmup_fraction}"
            )
        super().__init__(name)
        self.requires = frozenset({"features", "model"} if labels == "zero_shot" else {"features"})
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.weight_decay, self.warmup_fraction, self.labels, self.seed = (
            weight_decay,
            warmup_fraction,
            labels,
            seed,
        )
        self.num_classes: int | None = None
        for key in ("mean", "std", "weight", "bias"):
            self.register_buffer(key, torch.empty(0))
        self._parts: list[tuple[Tensor, Tensor]] = []

    def extra_repr(self) -> str:
        return (
            f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}, weight_decay={self.weight_decay}, "
            f"warmup_fraction={self.warmup_fraction}, labels={self.labels!r}, seed={self.seed}"
        )

    def configure(self, datamodule: object | None) -> None:
        """The class count from the data (so a class absent from the fit set still has a logit)."""
        self.num_classes = getattr(datamodule, "num_classes", None)

    def reset(self) -> None:
        super().reset()
        self._parts = []

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        """Keep one ID-train batch's ``[B, D]`` features (float32 or float64) and its labels."""
        if batch.features is None:
            raise ValueError(f"detector {self.name!r} needs features")
        features = batch.features.detach()
        features = features.float() if features.dtype != torch.float64 else features
        if self.labels == "zero_shot":
            zero_shot = getattr(batch.model, "zero_shot_logits", None)
            if zero_shot is None:
                raise ValueError(
                    f"detector {self.name!r}: labels='zero_shot' needs a CLIP method with zero-shot logits"
                )
            labels = zero_shot(features).argmax(dim=1)
        else:
            labels = targets.to(features.device).long()
            if len(labels) and int(labels.min()) < 0:
                raise ValueError(
                    f"detector {self.name!r} needs class labels >= 0 for every ID training image"
                )
        self._parts.append((features, labels))

    def finalize(self) -> None:
        """Gather every rank's features and labels, train the probe (rank 0's weights everywhere)."""
        local = torch.cat([f for f, _ in self._parts]) if self._parts else None
        labels = torch.cat([y for _, y in self._parts]) if self._parts else None
        self._parts = []
        features = gather_rows(local, device=self.mean.device, who=self.name)
        empty = torch.empty(0, dtype=torch.long, device=features.device)
        labels = all_gather_cat(labels if labels is not None else empty)
        # Undo the fit loader's rank interleaving: the probe sees the rows in dataset order, as on one process.
        order = torch.from_numpy(gathered_order(len(features), distributed_world()[1])).to(features.device)
        features, labels = _in_order(features, order), _in_order(labels.to(features.device), order)
        classes = self.num_classes or int(labels.max()) + 1
        probe = train_linear_probe(
            features, labels.to(features.device), classes, epochs=self.epochs, batch_size=self.batch_size,
            lr=self.lr, weight_decay=self.weight_decay, warmup_fraction=self.warmup_fraction, seed=self.seed,
        )  # fmt: skip
        for key, value in probe._asdict().items():
            setattr(self, key, broadcast(value.contiguous()))
        super().finalize()

    def logits(self, features: Tensor) -> Tensor:
        """``[B, C]`` probe logits of ``[B, D]`` features (in their dtype, at least float32)."""
        z = features.float() if features.dtype != torch.float64 else features
        return ((z - self.mean.to(z)) / self.std.to(z)) @ self.weight.to(z).T + self.bias.to(z)

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` ``-max_c softmax(logits)_c``; higher = more OOD."""
        if batch.features is None:
            raise ValueError(f"detector {self.name!r} needs features")
        return -self.logits(batch.features).softmax(dim=1).amax(dim=1)
