"""The types every part of lightning-ood exchanges: a method's forward pass, detector inputs, step outputs.

This module imports nothing else of the package, so that networks, detectors, methods, data and callbacks can
all depend on it without depending on each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

#: Everything a detector may ask for. ``head`` is the network's final linear layer, ``model`` a callable
#: ``inputs -> ModelOutputs`` (for detectors that run their own forward/backward pass, such as ODIN),
#: ``feature_maps`` the intermediate feature maps of the same forward pass (Gram, RankFeat, multi-layer
#: Mahalanobis); a method computes them only when a configured detector requires them.
CONSUMABLES = frozenset({"logits", "features", "head", "inputs", "model", "feature_maps"})

#: The groups an OOD test set belongs to.
OOD_GROUPS = ("near", "far")
#: The groups whose means are reported: ``near`` and ``far``, and ``all`` (every OOD set).
MEAN_GROUPS = (*OOD_GROUPS, "all")
#: Keys of a training batch of a method that trains with auxiliary outliers (:attr:`OODMethod.uses_outliers`).
ID_KEY, OUTLIER_KEY = "id", "outliers"


class ModelOutputs(NamedTuple):
    """One forward pass of a method's network.

    Attributes:
        logits: ``[B, C]`` class logits, or ``None`` for a method that does not classify (a frozen encoder).
        features: ``[B, D]`` the representation the feature-based detectors use (penultimate pooled features for
            a CNN, the [CLS] embedding after the final LayerNorm for a ViT), or ``None``.
        extras: further named products of the same pass that the method's own scores need (a feature map, an
            auxiliary head's output, ...), or ``None``.
        feature_maps: the intermediate feature maps of the same pass, shallow to deep, each ``[B, C_l, H_l,
            W_l]`` (a timm network's ``forward_intermediates``; the last one is the map the pooled ``features``
            come from), or ``None`` when no configured detector asked for them.
    """

    logits: Tensor | None = None
    features: Tensor | None = None
    extras: dict[str, Tensor] | None = None
    feature_maps: tuple[Tensor, ...] | None = None


@runtime_checkable
class ScoringModel(Protocol):
    """What a method exposes to detectors that need more than one forward pass's outputs."""

    def forward_outputs(self, inputs: Tensor) -> ModelOutputs: ...

    @property
    def head(self) -> nn.Linear | None: ...


@dataclass(frozen=True)
class DetectorInputs:
    """The inputs of ``Detector.update`` and ``Detector.score`` for one batch.

    Attributes:
        logits: ``[B, C]``, or ``None`` when the method does not classify.
        features: ``[B, D]`` or ``None``.
        head: the final ``nn.Linear`` mapping ``features`` to ``logits`` (``W: [C, D]``, ``b: [C]``), or ``None``.
        inputs: ``[B, ...]`` the (normalised) input images, or ``None``.
        model: the method, for detectors that run the network themselves, or ``None``.
        feature_maps: ``ModelOutputs.feature_maps`` of the same pass (each ``[B, C_l, H_l, W_l]``), or ``None``.

    Products that several detectors compute from the same batch (float64 features, features centred on the
    training mean, whitened features, log-softmax) are computed once per batch through :meth:`shared` and
    reused by the others; :func:`unshared` switches that off (the tests compare both paths).
    """

    logits: Tensor | None = None
    features: Tensor | None = None
    head: nn.Linear | None = None
    inputs: Tensor | None = None
    model: ScoringModel | None = None
    feature_maps: tuple[Tensor, ...] | None = None
    _memo: dict[Hashable, Any] = field(default_factory=dict, compare=False, repr=False)

    def shared(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per batch for each ``key`` (a key must name the product exactly: the
        operation and the content of every fitted tensor it uses)."""
        if not _SHARING[0]:
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @classmethod
    def from_outputs(
        cls,
        outputs: ModelOutputs,
        *,
        head: nn.Linear | None = None,
        inputs: Tensor | None = None,
        model: ScoringModel | None = None,
    ) -> DetectorInputs:
        return cls(
            logits=outputs.logits,
            features=outputs.features,
            head=head,
            inputs=inputs,
            model=model,
            feature_maps=outputs.feature_maps,
        )

    def available(self) -> frozenset[str]:
        return frozenset(
            f.name for f in fields(self) if not f.name.startswith("_") and getattr(self, f.name) is not None
        )


_SHARING = [True]


@contextlib.contextmanager
def unshared() -> Iterator[None]:
    """Within this context every detector computes its own products (no per-batch sharing)."""
    previous, _SHARING[0] = _SHARING[0], False
    try:
        yield
    finally:
        _SHARING[0] = previous


class TestStepOutput(NamedTuple):
    """What a method's ``test_step`` / ``predict_step`` returns (read by the evaluation and score callbacks).

    Attributes:
        scores: score name -> ``[B]`` OOD scores (higher = more OOD), float64, all from one forward pass: every
            configured detector and the method's own scores.
        preds: ``[B]`` predicted class indices, or ``None`` when the method does not classify.
        targets: ``[B]`` ground-truth class indices (``-1`` for OOD samples; the row index when scoring a
            folder of images).
    """

    __test__ = False  # not a pytest test class

    scores: dict[str, Tensor]
    preds: Tensor | None
    targets: Tensor
