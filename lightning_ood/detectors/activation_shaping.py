"""Detectors that reshape the penultimate activations, recompute the logits with the head and score energy.

ReAct clips large activations at a percentile of the ID training activations; ASH prunes each sample's
activations to its largest few and rescales them. Both then take the free energy of the recomputed logits.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, DetectorInputs, all_gather_cat, all_reduce_sum
from lightning_ood.detectors.gather import agree_layout
from lightning_ood.detectors.quantile import distributed_percentile
from lightning_ood.precision import at_least_float32, compute_dtype


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``[B]`` free energy ``-T * logsumexp(z / T)`` of ``[B, C]`` logits (Liu et al. 2020, eq. 5), in the
    logits' dtype promoted to at least float32."""
    return -temperature * torch.logsumexp(at_least_float32(logits) / temperature, dim=1)


def _head_logits(batch: DetectorInputs, features: Tensor, who: str) -> Tensor:
    """``[B, C]`` logits ``W h + b`` of ``[B, D]`` features, in the wider of their and the head's dtypes."""
    if batch.head is None:
        raise ValueError(f"{who} needs `head` (the final nn.Linear) to recompute the logits")
    # Post-hoc scores carry no autograd history, even outside no_grad.
    weight, bias = batch.head.weight.detach(), batch.head.bias
    dtype = compute_dtype(features, weight)
    bias = None if bias is None else bias.detach().to(dtype)
    return nn.functional.linear(features.to(dtype), weight.to(dtype), bias)


def _features(batch: DetectorInputs, who: str) -> Tensor:
    """``[B, D]`` features, half / bfloat16 promoted to float32 (float64 stays float64)."""
    if batch.features is None:
        raise ValueError(f"{who} needs `features`")
    return at_least_float32(batch.features.detach()).flatten(1)


def _bottom_k(rows: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` rows of ``rows`` ``[n, D]`` with the smallest ``keys`` ``[n]`` (all of them when ``n <= k``)."""
    if keys.numel() <= k:
        return rows, keys
    keep = keys.topk(k, largest=False).indices
    return rows[keep], keys[keep]


def percentile_linear(values: Tensor, q: float) -> float:
    """The ``q``-th percentile of all elements of ``values``, as ``np.percentile(values, q)`` computes it
    (``method="linear"``: interpolate between the two order statistics around rank ``q/100 * (M - 1)``).

    Uses two ``kthvalue`` selections (O(M) time, no sort, no size limit unlike ``torch.quantile``). One
    process, all values in one tensor; ReAct uses :func:`~lightning_ood.detectors.quantile.distributed_percentile`
    (the same value, over ranks).
    """
    flat = values.flatten()
    m = flat.numel()
    if m == 0:
        raise ValueError("percentile of an empty tensor")
    pos = q / 100.0 * (m - 1)
    lo = math.floor(pos)
    frac = pos - lo
    v_lo = float(flat.kthvalue(lo + 1).values)
    if frac == 0.0:
        return v_lo
    v_hi = float(flat.kthvalue(lo + 2).values)
    return v_lo + frac * (v_hi - v_lo)


class ReAct(Detector):
    """Rectified activations (Sun et al., NeurIPS 2021, "ReAct: Out-of-distribution detection with rectified
    activations", eq. 1-2), scored with the energy.

    ``h_bar = min(h, c)`` elementwise on the ``[B, D]`` penultimate features, ``z = W h_bar + b`` with the
    network's head, score ``-T * logsumexp(z / T)``. Higher = more OOD.

    ``c`` is the ``percentile``-th percentile of *all* ``N * D`` feature values of the ID training set (the
    paper's rule), computed exactly like ``np.percentile`` (linear interpolation). Fitting keeps this rank's
    features (float32, or float64 for float64 features: ``N * D * 4 / W`` bytes on their device with ``W``
    ranks, e.g. 100 MB for 50k x 512 on one process, 1.3 GB per GPU for ImageNet-1K with ResNet-50 on 8) until
    ``finalize``, which computes the percentile of every rank's values together without gathering them
    (:func:`~lightning_ood.detectors.quantile.distributed_percentile`: histogram all-reduces refined to the
    exact order statistics), so a DDP fit gives exactly the one-process threshold (error 0). For huge ``N``
    set ``max_samples`` to keep a uniform random subset of that many training rows (bottom-k sampling with
    seeded random keys; only the keys are gathered across ranks). That threshold
    is then an estimate whose value depends on the seed, data order and world size; its rank error is about
    ``sqrt(p (1 - p) / (max_samples * D))`` in quantile units (at 10k rows x 512: ~2e-4, ignoring the
    correlation of values within a row).
    After fitting only the scalar ``c`` is kept (a buffer).

    Args:
        percentile: ``p`` in ``[0, 100]``; the paper uses 90.
        temperature: energy temperature ``T > 0``; the paper uses 1.
        threshold: a fixed clipping value ``c``; when given, no fitting is needed (and none is done).
        max_samples: keep at most this many ID-train rows for the percentile; ``None`` keeps all (exact).
        seed: seed of the subsampling keys (used only with ``max_samples``).
        name: log key; defaults to ``"react"``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features", "head"})
    needs_fit: ClassVar[bool] = True

    threshold_: Tensor

    def __init__(
        self,
        percentile: float = 90.0,
        temperature: float = 1.0,
        threshold: float | None = None,
        max_samples: int | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if not 0 <= percentile <= 100:
            raise ValueError(f"ReAct percentile must be in [0, 100], got {percentile}")
        if temperature <= 0:
            raise ValueError(f"ReAct temperature must be > 0, got {temperature}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"ReAct max_samples must be >= 1 or None, got {max_samples}")
        # A fixed threshold makes this instance fit-free; the class default stays True.
        self.needs_fit = threshold is None  # type: ignore[misc]
        super().__init__(name or "react")  # not the snake-case default "re_act"
        self.percentile = percentile
        self.temperature = temperature
        self.threshold = threshold
        self.max_samples = max_samples
        self.seed = seed
        init = math.nan if threshold is None else float(threshold)
        self.register_buffer("threshold_", torch.tensor(init, dtype=torch.float64))
        self._rows: list[Tensor] = []
        self._keys: list[Tensor] = []
        self._generator: torch.Generator | None = None
        self._followers: list[ReAct] = []  # detectors whose threshold this one's finalize also sets

    def fit_state_key(self) -> str | None:
        """Every fitted ReAct with the same subsampling keeps the same activations, whatever its percentile."""
        if type(self) is not ReAct or not self.needs_fit:
            return None
        return f"ReAct(max_samples={self.max_samples}, seed={self.seed})"

    def share_fit_with(self, followers: list[Detector]) -> None:
        self._followers = [det for det in followers if isinstance(det, ReAct)]

    def extra_repr(self) -> str:
        return (
            f"percentile={self.percentile}, temperature={self.temperature}, threshold={self.threshold}, "
            f"max_samples={self.max_samples}, seed={self.seed}"
        )

    def reset(self) -> None:
        super().reset()
        self._rows, self._keys, self._generator = [], [], None

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        """Keep this batch's ``[B, D]`` features (or, with ``max_samples``, a running uniform subset)."""
        if not self.needs_fit:
            return
        rows = _features(batch, "ReAct")
        if self.max_samples is None:
            self._rows.append(rows)
            return
        if self._generator is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank)
        keys = torch.rand(rows.shape[0], generator=self._generator, dtype=torch.float64).to(rows.device)
        self._rows.append(rows)
        self._keys.append(keys)
        if sum(key.numel() for key in self._keys) > 2 * self.max_samples:  # amortised: memory <= 2x the cap
            self._subsample()

    def _subsample(self) -> None:
        # Bottom-k sampling: the rows with the max_samples smallest iid uniform keys are a uniform sample.
        assert self.max_samples is not None
        rows, keys = _bottom_k(torch.cat(self._rows), torch.cat(self._keys), self.max_samples)
        self._rows, self._keys = [rows], [keys]

    def finalize(self) -> None:
        """Set ``threshold_`` to the ``percentile`` of every rank's kept rows together (not gathered).

        A collective: every rank must call it, also one that got no fit batch (it contributes no rows). Raises
        on every rank when no rank saw any feature.
        """
        if self.needs_fit:
            device = self.threshold_.device
            # Agree on D and the dtype from an empty slice: the kept batches are not concatenated (no 2x copy).
            like = agree_layout(self._rows[0][:0] if self._rows else None, device=device, who=self.name)
            parts = [rows.to(like.dtype) for rows in self._rows] or [like]
            if self.max_samples is not None:
                parts = [self._global_subset(torch.cat(parts))]
            self._rows, self._keys = [], []
            held = int(
                all_reduce_sum(torch.tensor([sum(p.numel() for p in parts)], device=like.device)).item()
            )
            if held == 0:
                raise RuntimeError(
                    f"detector {self.name!r}: no ID training features on any rank (every fit batch was empty)"
                )
            followers, self._followers = self._followers, []
            thresholds: dict[float, float] = {}
            for det in (self, *followers):
                if det.percentile not in thresholds:
                    thresholds[det.percentile] = distributed_percentile(
                        parts, det.percentile, device=like.device
                    )
                det.threshold_.fill_(thresholds[det.percentile])
                det._fitted.fill_(True)
        super().finalize()

    def _global_subset(self, local: Tensor) -> Tensor:
        """This rank's rows among the ``max_samples`` rows with the smallest keys over all ranks (only the keys,
        at most ``max_samples`` per rank, are gathered)."""
        assert self.max_samples is not None
        keys = torch.cat(self._keys) if self._keys else torch.empty(0, dtype=torch.float64)
        keys = keys.to(local.device)
        local, keys = _bottom_k(local, keys, self.max_samples)
        every = all_gather_cat(keys)
        if every.numel() <= self.max_samples:
            return local
        cut = every.kthvalue(self.max_samples).values  # iid continuous keys: no ties
        return local[keys <= cut]

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` energy of the logits of the clipped ``[B, D]`` features; higher = more OOD."""
        clipped = _features(batch, "ReAct").clamp(max=float(self.threshold_))
        return energy(_head_logits(batch, clipped, "ReAct"), self.temperature)


AshVariant = Literal["s", "b", "p"]


def ash(features: Tensor, percentile: float, variant: AshVariant = "s") -> Tensor:
    """Activation shaping of ``[B, D]`` features (Djurisic et al., ICLR 2023, "Extremely simple activation
    shaping for out-of-distribution detection", Sec. 3 / Alg. 1), per sample.

    Keep the ``k = D - round(D * percentile / 100)`` largest values and zero the rest (ASH-P); then ASH-B sets
    every kept value to ``s1 / k``, ASH-S multiplies the kept values by ``exp(s1 / s2)``, with ``s1`` the sum
    of all values before pruning and ``s2`` the sum of the kept values (the official code's rules). The method
    assumes non-negative (post-ReLU) activations; a row whose kept values sum to 0 is left unscaled.
    """
    d = features.shape[1]
    k = d - round(d * percentile / 100.0)
    if k < 1:
        raise ValueError(f"ASH percentile {percentile} keeps no activation of D={d}")
    s1 = features.sum(dim=1, keepdim=True)
    top = features.topk(k, dim=1, sorted=False)  # the same k entries; their order does not matter
    values = top.values
    if variant == "b":
        values = (s1 / k).expand_as(values)
    elif variant == "s":
        s2 = values.sum(dim=1, keepdim=True)
        scale = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1.0), 0.0)
        values = values * scale.exp()
    return torch.zeros_like(features).scatter(1, top.indices, values)


class ASH(Detector):
    """Activation shaping (Djurisic et al., ICLR 2023) of the ``[B, D]`` penultimate features, then the energy
    ``-T * logsumexp(z / T)`` of the recomputed logits ``z = W ash(h) + b``. Higher = more OOD. No fitting.

    Args:
        percentile: share of each sample's activations to prune, in ``[0, 100)``; 90 (the paper uses 90 for
            ImageNet ASH-S, 95 for CIFAR).
        variant: ``"s"`` (scale, the paper's best), ``"b"`` (binarise) or ``"p"`` (prune only); see
            :func:`ash`.
        temperature: energy temperature ``T > 0``.
        name: log key; defaults to ``"ash"``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features", "head"})

    def __init__(
        self,
        percentile: float = 90.0,
        variant: AshVariant = "s",
        temperature: float = 1.0,
        name: str | None = None,
    ) -> None:
        if not 0 <= percentile < 100:
            raise ValueError(f"ASH percentile must be in [0, 100), got {percentile}")
        if variant not in ("s", "b", "p"):
            raise ValueError(f"ASH variant must be 's', 'b' or 'p', got {variant!r}")
        if temperature <= 0:
            raise ValueError(f"ASH temperature must be > 0, got {temperature}")
        super().__init__(name)
        self.percentile = percentile
        self.variant = variant
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, variant={self.variant!r}, temperature={self.temperature}"

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` energy of the logits of the shaped ``[B, D]`` features; higher = more OOD."""
        shaped = ash(_features(batch, "ASH"), self.percentile, self.variant)
        return energy(_head_logits(batch, shaped, "ASH"), self.temperature)
