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

from lightning_ood.detectors.base import Detector, DetectorInputs, all_reduce_max, all_reduce_sum
from lightning_ood.detectors.gather import agree_layout, dataset_index, row_counts
from lightning_ood.distributed import broadcast

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
    index: Tensor | None = None,
) -> ProbeWeights:
    """Train a linear probe on standardised ``features`` ``[N, D]`` with ``labels`` ``[N]`` (deterministic).

    Standardisation uses the features' mean and (unbiased) standard deviation (computed in float64); a
    constant dimension gets ``std = 1``. The layer starts from PyTorch's default ``nn.Linear`` initialisation
    drawn from a generator seeded with ``seed``, which also shuffles every epoch. Adam with learning rate
    ``lr * batch_size / 256`` and L2 ``weight_decay`` on weight and bias, the learning rate set per step by
    :func:`warmup_cosine`. Runs on the features' device in float32 (at least); memory is the features plus
    ``O(C * D)``.

    Data-parallel under DDP: ``features`` / ``labels`` are this rank's rows and ``index`` ``[n]`` their dataset
    indices (the ranks' rows together are the ``N`` training rows, each once; ``None``: one process). The
    statistics and every step's gradient are summed over the ranks (the gradient of each shuffled mini-batch
    is the sum over its rows, whichever rank holds them), so every rank runs the one-process probe's
    optimisation (equal up to float summation order) while holding only ``N / W`` rows. A collective every rank
    enters, also one without rows (``[0, D]`` features).
    """
    n_local = features.shape[0]
    if labels.shape != (n_local,):
        raise ValueError(
            f"the probe needs [N, D] features with [N] labels, got {tuple(features.shape)}, {labels.shape}"
        )
    n = int(all_reduce_sum(torch.tensor([n_local], device=features.device)).item())
    if n == 0:
        raise ValueError("the probe needs at least one training feature (got none on any rank)")
    x, mean, std = _standardised(features, n)
    gen = torch.Generator().manual_seed(seed)
    weight, bias = _initial_layer(num_classes, x.shape[1], gen, x)
    base_lr = lr * batch_size / 256
    optimizer = torch.optim.Adam([weight, bias], lr=base_lr, weight_decay=weight_decay)
    total, step = epochs * math.ceil(n / batch_size), 0
    labels = labels.to(x.device)
    local = None  # dataset index -> row of this rank (-1: another rank's)
    if index is not None:
        local = torch.full((n,), -1, dtype=torch.long, device=x.device)
        local[index.to(x.device)] = torch.arange(n_local, device=x.device)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device)
            for start in range(0, n, batch_size):
                batch = order[start : start + batch_size]
                rows = batch if local is None else local[batch][local[batch] >= 0]
                for group in optimizer.param_groups:
                    group["lr"] = base_lr * warmup_cosine(step, total, warmup_fraction)
                logits = x[rows] @ weight.T + bias
                loss = F.cross_entropy(logits, labels[rows], reduction="sum") / len(batch)
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                _sum_gradients(weight, bias)
                optimizer.step()
                step += 1
    return ProbeWeights(mean, std, weight.detach(), bias.detach())


def _sum_gradients(weight: Tensor, bias: Tensor) -> None:
    """Sum the gradients over the ranks (one all-reduce; a no-op in one process)."""
    flat = torch.cat([weight.grad.reshape(-1), bias.grad])
    all_reduce_sum(flat)
    weight.grad.copy_(flat[: weight.numel()].view_as(weight))
    bias.grad.copy_(flat[weight.numel() :])


def _standardised(features: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, mean, std)``: ``[n_local, D]`` features in float32 (float64 kept) standardised per dimension with
    the mean and unbiased standard deviation of all ``n`` rows over the ranks (float64 sums, two passes; ``1``
    for a constant dimension or a single sample)."""
    x = features.float() if features.dtype != torch.float64 else features
    mean = all_reduce_sum(_column_sums(x, lambda rows: rows)) / n
    std = torch.ones_like(mean)
    if n > 1:
        std = (all_reduce_sum(_column_sums(x, lambda rows: (rows - mean).square())) / (n - 1)).sqrt()
    mean, std = mean.to(x.dtype), std.to(x.dtype)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return x.sub_(mean).div_(std) if x is not features else (x - mean) / std, mean, std


def _column_sums(x: Tensor, term, chunk: int = 4096) -> Tensor:
    """``[D]`` float64 ``sum_i term(x_i)`` over the rows of ``x``, ``chunk`` rows at a time (no float64 copy of
    ``x``)."""
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        out += term(x[start : start + chunk].double()).sum(dim=0)
    return out


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
    the recipe (Adaloglou et al., TMLR 2024). Fitting keeps this rank's ID-train features in memory (``N * D * 4 /
    W`` bytes on the features' device with ``W`` ranks, e.g. 50k x 1280 x 4 B = 256 MB on one process, 1.3 GB
    per GPU for ImageNet-1K with ResNet-50 on 8), then trains in ``finalize``: ``epochs * ceil(N /
    batch_size)`` Adam steps of a ``[batch, D] x [D, C]`` product. Under DDP the training is data-parallel
    (:func:`train_linear_probe`: nothing is gathered, one ``C * (D + 1)`` gradient all-reduce per step; the
    mini-batches are those of one process over the dataset indices), so the probe is the one-process probe,
    and rank 0's weights are broadcast so every rank scores with exactly the same.

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
        """Train the probe data-parallel on every rank's own rows (none gathered); rank 0's weights everywhere.

        A collective: every rank must call it, also one that got no fit batch.
        """
        local = torch.cat([f for f, _ in self._parts]) if self._parts else None
        labels = torch.cat([y for _, y in self._parts]) if self._parts else None
        self._parts = []
        features = agree_layout(local, device=self.mean.device, who=self.name)
        if labels is None:
            labels = torch.empty(0, dtype=torch.long, device=features.device)
        counts = row_counts(len(features), features.device)
        if sum(counts) == 0:
            raise RuntimeError(
                f"detector {self.name!r}: no ID training features on any rank (every fit batch was empty)"
            )
        # The dataset index of each row: every step's mini-batch holds the one-process probe's rows.
        index = dataset_index(counts, features.device)
        top = int(labels.max()) + 1 if len(labels) else 0
        classes = self.num_classes or int(all_reduce_max(torch.tensor([top], device=features.device)).item())
        probe = train_linear_probe(
            features, labels.to(features.device), classes, epochs=self.epochs, batch_size=self.batch_size,
            lr=self.lr, weight_decay=self.weight_decay, warmup_fraction=self.warmup_fraction, seed=self.seed,
            index=index,
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
