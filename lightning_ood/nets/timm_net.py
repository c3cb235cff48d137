"""A timm model seen as (features, logits): one forward pass gives both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from lightning_ood.contract import ModelOutputs
from lightning_ood.nets.hub import pretrained_or_explain


def create_timm_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    pretrained: bool = False,
    weights_path: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model, optionally from pretrained weights (hub) or a local weights file.

    A local file goes through timm's own pretrained loader (``pretrained_cfg_overlay={"file": ...}``), so the
    same adaptations apply as for hub weights: the first conv is adapted to ``in_chans``, a classifier of the
    wrong size is re-initialised, and ViT position embeddings are resized when the patch grid changes.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights_path={str(path)!r} does not exist. Point it at a local timm/PyTorch weights file "
                "(.pth, .bin or .safetensors), or set pretrained=true to download weights by model name."
            )
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=num_classes,
            in_chans=in_chans,
            **kwargs,
        )
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; see `timm.list_models()` (e.g. 'resnet18', 'resnet10t', "
            "'vit_tiny_patch16_224', 'deit_small_patch16_224')"
        )
    if not pretrained:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return pretrained_or_explain(
        lambda: timm.create_model(
            name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs
        ),
        f"timm model {name!r}",
    )


class TimmNet(nn.Module):
    """A timm classifier split into a feature extractor and its final linear head.

    ``forward(x)`` returns :class:`ModelOutputs` with ``features = forward_head(forward_features(x),
    pre_logits=True)`` (``[B, D]``: the globally pooled penultimate features of a CNN, the [CLS] token after the
    final LayerNorm of a ``global_pool="token"`` ViT) and ``logits = head(features)`` (``[B, C]``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{type(model).__name__}.get_classifier() is {type(head).__name__}, not nn.Linear; lightning-ood "
                "needs a linear head on the pooled features (set num_classes > 0)."
            )

    @property
    def head(self) -> nn.Linear:
        return self.model.get_classifier()

    def head_matches_weights(self, num_classes: int) -> bool:
        """Whether loading the model's weights kept their classifier: timm keeps it only when the weights were
        made for ``num_classes`` classes (else it re-initialises the head)."""
        return getattr(self.model, "pretrained_cfg", {}).get("num_classes") == num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        """The backbone's unpooled output (``[B, C, h, w]`` for a CNN, ``[B, N, D]`` tokens for a ViT)."""
        return self.model.forward_features(x)

    def pool(self, feature_map: Tensor) -> Tensor:
        """Pooled pre-logit features ``[B, D]`` from :meth:`forward_features`'s output."""
        return self.model.forward_head(feature_map, pre_logits=True)

    def forward(self, x: Tensor, feature_maps: bool = False) -> ModelOutputs:
        """``ModelOutputs(logits, features)``; with ``feature_maps=True`` also every stage's output (``[B, C_l,
        H_l, W_l]``, shallow to deep) from the same pass, through timm's ``forward_intermediates``."""
        if not feature_maps:
            features = self.pool(self.forward_features(x))
            return ModelOutputs(logits=self.head(features), features=features)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"{type(self.model).__name__} has no forward_intermediates, so it cannot give the feature maps "
                "that a configured detector (Gram, RankFeat, MultiLayerMahalanobis) needs; remove that detector"
            )
        final, maps = self.model.forward_intermediates(x)
        features = self.pool(final)
        return ModelOutputs(logits=self.head(features), features=features, feature_maps=tuple(maps))
