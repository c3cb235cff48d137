"""Detectors of the intermediate feature maps of the same forward pass: RankFeat, Gram, multi-layer Mahalanobis.

They consume ``feature_maps`` (:attr:`~lightning_ood.contract.DetectorInputs.feature_maps`: a tuple of ``[B,
C_l, H_l, W_l]`` stage outputs, shallow to deep, which a method computes only when such a detector is
configured). Fits stream per-layer statistics; no map is stored beyond the batch (Gram's held-out share
keeps its small per-layer statistics, not maps).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, DetectorInputs, all_reduce_max, all_reduce_sum
from lightning_ood.detectors.mahalanobis import Mahalanobis
from lightning_ood.detectors.streaming import energy_of, linear_logits, logits_of
from lightning_ood.precision import at_least_float32

_F64 = torch.float64
_MAX_LAYERS = 64


def selected_maps(batch: DetectorInputs, layers: Sequence[int] | None, who: str) -> list[Tensor]:
    """The chosen ``[B, C_l, H_l, W_l]`` maps (all when ``layers`` is ``None``), detached, at least float32."""
    if batch.feature_maps is None:
        raise ValueError(f"{who} needs `feature_maps` (intermediate feature maps of the forward pass)")
    maps = batch.feature_maps
    chosen = range(len(maps)) if layers is None else layers
    try:
        return [at_least_float32(maps[i].detach()) for i in chosen]
    except IndexError:
        raise ValueError(f"{who} layers {list(chosen)} out of range for {len(maps)} feature maps") from None


def remove_rank_one(maps: Tensor) -> Tensor:
    """``X - s_1 u_1 v_1^T`` for each sample's ``[C, H*W]`` matrix of ``[B, C, H, W]`` maps (exact SVD)."""
    b, c, h, w = maps.shape
    x = maps.reshape(b, c, h * w)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (x - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).reshape(b, c, h, w)


class RankFeat(Detector):
    """RankFeat (Song et al., NeurIPS 2022, "RankFeat: Rank-1 feature removal for out-of-distribution
    detection", eq. 2-3): energy of ``W pool(X - s_1 u_1 v_1^T) + b`` for the last feature map ``X`` ``[C,
    H*W]`` per sample (the paper's block-4 variant; exact SVD instead of its power iteration).

    The global average pool of the last map must be the network's ``features`` (a CNN with average pooling;
    checked per batch, a ViT's [CLS] features are refused). With a ``1 x 1`` last map the rank-1 part is the
    whole map, so every sample scores the head's bias energy: use inputs large enough for ``H*W > 1``.
    Higher = more OOD; no fitting. Cost: one batched SVD of ``[B, C, H*W]``.

    Args:
        temperature: energy temperature ``T > 0``; 1.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"feature_maps", "features", "head"})
    default_name = "rank_feat"

    def __init__(self, temperature: float = 1.0, name: str | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"RankFeat temperature must be > 0, got {temperature}")
        super().__init__(name)
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` energy of the logits of the rank-1-removed, pooled last map; higher = more OOD."""
        last = selected_maps(batch, [-1], "RankFeat")[0]
        pooled = last.mean(dim=(2, 3))
        feats = at_least_float32(batch.features.detach()).flatten(1)
        if pooled.shape != feats.shape or not torch.allclose(
            pooled, feats.to(pooled.dtype), rtol=1e-4, atol=1e-5
        ):
            raise ValueError(
                "RankFeat needs `features` to be the global average pool of the last feature map (a CNN with "
                f"average pooling); got maps {tuple(last.shape)} and features {tuple(feats.shape)} that differ"
            )
        removed = remove_rank_one(last.double() if last.dtype == _F64 else last).mean(dim=(2, 3))
        return energy_of(linear_logits(batch, removed, "RankFeat"), self.temperature)


def gram_rows(maps: Tensor, power: int) -> Tensor:
    """``[B, C]`` row sums of the ``p``-th order Gram matrix ``(F^p F^p^T)^(1/p)`` of ``[B, C, H, W]`` maps
    (powers elementwise, the ``1/p`` root sign-preserving), as Sastry & Oore's official code.

    A row sum of ``G = F F^T`` is ``sum_j <f_i, f_j> = <f_i, sum_j f_j>``, so it is computed as one
    ``[B, C, HW] . [B, HW]`` product: ``O(B C HW)`` instead of the ``O(B C^2 HW)`` of forming ``G`` (the same
    values up to float64 summation order; 13.8 s -> well under 1 s per 128 images of a ResNet's five maps)."""
    f = (maps.flatten(2).to(_F64)) ** power  # [B, C, HW]
    g = torch.einsum("bcs,bs->bc", f, f.sum(dim=1))
    return g.sign() * g.abs() ** (1.0 / power)


def gram_deviation(g: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``[B]`` ``sum_j relu(low - g) / |low + 1e-6| + relu(g - high) / |high + 1e-6|`` (the paper's eq. 3)."""
    return ((low - g).relu() / (low + 1e-6).abs() + (g - high).relu() / (high + 1e-6).abs()).sum(dim=1)


class Gram(Detector):
    """Gram-matrix deviations (Sastry & Oore, ICML 2020, "Detecting out-of-distribution examples with Gram
    matrices", eq. 1-4): ``sum_l delta_l(x) / E[delta_l]`` (higher = more OOD).

    For each chosen layer ``l`` and power ``p = 1..poles``, the ``[C_l]`` row sums of the ``p``-th order Gram
    matrix (:func:`gram_rows`) are compared with the per-class minimum and maximum over the fit samples the
    network predicts as that class (a class never predicted there takes the bounds over all classes);
    ``delta_l`` is the summed :func:`gram_deviation` against the bounds of
    the predicted class. ``E[delta_l]`` is the mean deviation of a held-out share of the fit samples (every
    ``holdout_every``-th sample of each rank, left out of the bounds; ``0``: no normalisation, all samples
    in the bounds). Memory: ``[C, C_l]`` bounds per layer and power (min / max reduced over ranks) plus the
    held-out samples' deviations are computed at the end from their ``[poles, C_l]`` statistics (kept, not
    their maps). Cost per batch: ``poles`` Gram products ``[C_l, HW] x [HW, C_l]`` per layer. Opt-in.

    Args:
        poles: highest power ``P >= 1``; 10 (the paper's).
        layers: indices into ``feature_maps`` (``None``: all).
        holdout_every: hold out every n-th fit sample for ``E[delta_l]``; 10 (a tenth, as pytorch-ood).
    """

    requires: ClassVar[frozenset[str]] = frozenset({"feature_maps", "logits"})
    needs_fit: ClassVar[bool] = True
    default_name = "gram"

    def __init__(
        self,
        poles: int = 10,
        layers: Sequence[int] | None = None,
        holdout_every: int = 10,
        name: str | None = None,
    ) -> None:
        if poles < 1 or holdout_every < 0 or holdout_every == 1:
            raise ValueError(
                f"Gram needs poles >= 1 and holdout_every 0 or >= 2, got {poles}, {holdout_every}"
            )
        super().__init__(name)
        self.poles, self.layers, self.holdout_every = (
            poles,
            None if layers is None else list(layers),
            holdout_every,
        )
        self._num_layers = 0  # buffers bounds0, bounds1, ...: per layer [2, C, poles, C_l] (min, max)
        self.register_buffer("layer_norm", torch.empty(0, dtype=_F64))  # [L]
        self._clear()

    def extra_repr(self) -> str:
        return f"poles={self.poles}, layers={self.layers}, holdout_every={self.holdout_every}"

    def _clear(self) -> None:
        self._low: list[Tensor] = []
        self._high: list[Tensor] = []
        self._held: list[tuple[list[Tensor], Tensor]] = []
        self._seen = 0

    def reset(self) -> None:
        super().reset()
        self._clear()

    def stats(self, batch: DetectorInputs) -> list[Tensor]:
        """Per chosen layer ``[B, poles, C_l]`` float64 Gram row sums."""
        maps = selected_maps(batch, self.layers, "Gram")
        return [torch.stack([gram_rows(m, p) for p in range(1, self.poles + 1)], dim=1) for m in maps]

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        stats, pred = self.stats(batch), logits_of(batch, "Gram").argmax(dim=1)
        c, n = logits_of(batch, "Gram").shape[1], pred.shape[0]
        held = torch.zeros(n, dtype=torch.bool, device=pred.device)
        if self.holdout_every:
            held = (torch.arange(n, device=pred.device) + self._seen) % self.holdout_every == 0
        self._seen += n
        if not self._low:
            self._low = [torch.full((c, *s.shape[1:]), torch.inf, dtype=_F64, device=s.device) for s in stats]
            self._high = [
                torch.full((c, *s.shape[1:]), -torch.inf, dtype=_F64, device=s.device) for s in stats
            ]
        keep = ~held
        index = pred[keep]
        for low, high, s in zip(self._low, self._high, stats, strict=True):
            idx = index.view(-1, 1, 1).expand(-1, *s.shape[1:])
            low.scatter_reduce_(0, idx, s[keep], reduce="amin")
            high.scatter_reduce_(0, idx, s[keep], reduce="amax")
        if bool(held.any()):
            self._held.append(([s[held] for s in stats], pred[held]))

    def finalize(self) -> None:
        self._agree_shapes()
        bounds = []
        for low, high in zip(self._low, self._high, strict=True):
            both = all_reduce_max(torch.stack([-low, high]))
            bounds.append(torch.stack([-both[0], both[1]]))
        never = torch.isinf(bounds[0][0]).flatten(1).all(dim=1)  # classes never predicted on the fit set
        if bool(never.all()):
            raise RuntimeError(
                f"detector {self.name!r} (Gram): every fit sample was held out; lower holdout_every"
            )
        for b in bounds:  # they take the bounds over all classes
            b[0][never], b[1][never] = b[0][~never].amin(dim=0), b[1][~never].amax(dim=0)
        sums = torch.zeros(len(bounds), 2, dtype=_F64, device=bounds[0].device)
        for stats, pred in self._held:
            for i, (s, b) in enumerate(zip(stats, bounds, strict=True)):
                sums[i, 0] += self._layer_deviation(s, pred, b).sum()
                sums[i, 1] += pred.shape[0]
        sums = all_reduce_sum(sums)
        mean = sums[:, 0] / sums[:, 1].clamp_min(1.0)
        self.layer_norm = torch.where(mean > 0, mean, torch.ones_like(mean))
        self._set_bounds(bounds)
        self._clear()
        super().finalize()

    def _agree_shapes(self) -> None:
        """Agree on ``C`` and every layer's ``C_l`` across ranks; a rank without fit batches makes empty bounds."""
        dims = [self._low[0].shape[0], *(low.shape[-1] for low in self._low)] if self._low else []
        if len(dims) > _MAX_LAYERS + 1:
            raise ValueError(f"Gram supports at most {_MAX_LAYERS} layers, got {len(dims) - 1}")
        info = torch.tensor([len(dims), *dims, *[0] * (_MAX_LAYERS + 1 - len(dims))], dtype=torch.long)
        agreed = all_reduce_max(info.to(self.layer_norm.device)).tolist()
        if agreed[0] == 0:
            raise RuntimeError(
                f"detector {self.name!r} (Gram): no fit batch on any rank; fit it on ID training data"
            )
        if not self._low:
            c, widths = agreed[1], agreed[2 : agreed[0] + 1]
            shapes = [(c, self.poles, w) for w in widths]
            device = self.layer_norm.device
            self._low = [torch.full(s, torch.inf, dtype=_F64, device=device) for s in shapes]
            self._high = [torch.full(s, -torch.inf, dtype=_F64, device=device) for s in shapes]

    def _set_bounds(self, bounds: list[Tensor]) -> None:
        for i in range(self._num_layers):
            delattr(self, f"bounds{i}")
        for i, b in enumerate(bounds):
            self.register_buffer(f"bounds{i}", b.to(self.layer_norm.device))
        self._num_layers = len(bounds)

    @property
    def bounds(self) -> list[Tensor]:
        """Per chosen layer ``[2, C, poles, C_l]``: the per-class minimum and maximum Gram statistics."""
        return [getattr(self, f"bounds{i}") for i in range(self._num_layers)]

    @staticmethod
    def _layer_deviation(stats: Tensor, pred: Tensor, bounds: Tensor) -> Tensor:
        low, high = bounds[0][pred], bounds[1][pred]  # [B, poles, C_l]
        return gram_deviation(stats.flatten(1), low.flatten(1), high.flatten(1))

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` normalised total deviation; higher = more OOD."""
        pred = logits_of(batch, "Gram").argmax(dim=1)
        total = torch.zeros(pred.shape[0], dtype=_F64, device=pred.device)
        for i, (s, b) in enumerate(zip(self.stats(batch), self.bounds, strict=True)):
            total += self._layer_deviation(s, pred, b.to(s.device)) / self.layer_norm[i].to(s.device)
        return total

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        n = sum(1 for key in state_dict if re.fullmatch(re.escape(prefix) + r"bounds\d+", key))
        self._set_bounds([torch.empty_like(state_dict[f"{prefix}bounds{i}"]) for i in range(n)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MultiLayerMahalanobis(Detector):
    """Mahalanobis feature ensemble (Lee et al., NeurIPS 2018, Sec. 2.3 / Alg. 1 without input
    preprocessing): ``sum_l w_l min_c (f_l - mu_lc)^T Sigma_l^-1 (f_l - mu_lc)`` (higher = more OOD).

    ``f_l`` ``[B, C_l]`` is the spatial mean of layer ``l``'s map; each layer is a tied-covariance
    :class:`~lightning_ood.detectors.Mahalanobis` (its streaming float64 fit, ``O(C C_l + C_l^2)`` memory). The
    paper learns ``w`` by logistic regression on validation OOD data; without OOD data the default is
    ``w_l = 1 / C_l`` (an ID sample's squared distance is about ``C_l``, so each layer weighs about equally).

    Args:
        layers: indices into ``feature_maps`` (``None``: all).
        layer_weights: ``w_l`` per chosen layer, or ``None`` for ``1 / C_l``.
        ridge: relative ridge of every layer's covariance; 1e-6.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"feature_maps"})
    needs_fit: ClassVar[bool] = True
    default_name = "multi_layer_mahalanobis"

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        layer_weights: Sequence[float] | None = None,
        ridge: float = 1e-6,
        name: str | None = None,
    ) -> None:
        if layers is not None and layer_weights is not None and len(layers) != len(layer_weights):
            raise ValueError(f"MultiLayerMahalanobis: {len(layer_weights)} weights for {len(layers)} layers")
        super().__init__(name)
        self.layers = None if layers is None else list(layers)
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.ridge = ridge
        self.per_layer = nn.ModuleList()

    def extra_repr(self) -> str:
        return f"layers={self.layers}, layer_weights={self.layer_weights}, ridge={self.ridge}"

    def _layer_inputs(self, batch: DetectorInputs) -> list[DetectorInputs]:
        maps = selected_maps(batch, self.layers, "MultiLayerMahalanobis")
        if self.layer_weights is not None and len(maps) != len(self.layer_weights):
            raise ValueError(f"MultiLayerMahalanobis: {len(self.layer_weights)} weights for {len(maps)} maps")
        return [DetectorInputs(features=m.mean(dim=(2, 3)), logits=batch.logits) for m in maps]

    def reset(self) -> None:
        super().reset()
        self.per_layer = nn.ModuleList()

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        inputs = self._layer_inputs(batch)
        if not len(self.per_layer):
            self.per_layer = nn.ModuleList(
                [Mahalanobis(ridge=self.ridge, name=f"layer{i}") for i in range(len(inputs))]
            ).to(self._fitted.device)
            for det in self.per_layer:
                det.reset()
        for det, x in zip(self.per_layer, inputs, strict=True):
            det.update(x, targets)

    def finalize(self) -> None:
        count = torch.tensor([len(self.per_layer)], dtype=torch.long, device=self._fitted.device)
        layers = int(all_reduce_max(count)[0])
        if layers == 0:
            raise RuntimeError(
                f"detector {self.name!r}: no fit batch on any rank; fit it on ID training data"
            )
        if not len(self.per_layer):  # a rank without fit batches takes part with empty statistics
            self.per_layer = nn.ModuleList(
                [Mahalanobis(ridge=self.ridge, name=f"layer{i}") for i in range(layers)]
            ).to(self._fitted.device)
        for det in self.per_layer:
            det.finalize()
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` weighted sum of the per-layer squared distances; higher = more OOD."""
        total = None
        for i, (det, x) in enumerate(zip(self.per_layer, self._layer_inputs(batch), strict=True)):
            weight = self.layer_weights[i] if self.layer_weights is not None else 1.0 / x.features.shape[1]
            part = weight * det(x).to(_F64)
            total = part if total is None else total + part
        return total

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        n = len(
            {key[len(prefix) :].split(".")[1] for key in state_dict if key.startswith(prefix + "per_layer.")}
        )
        if n != len(self.per_layer):
            self.per_layer = nn.ModuleList(
                [Mahalanobis(ridge=self.ridge, name=f"layer{i}") for i in range(n)]
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
