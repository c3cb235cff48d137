"""The SSOD network and its maths (Pei et al., ICLR 2024, "Image Background Serves as Good Proxy for
Out-of-distribution Data", arXiv 2307.00519).

A convolutional timm classifier whose last feature map ``F`` (``[B, C, h, w]``) is read twice: pooled, as usual,
into the feature ``f`` and the logits ``W f + b``; and location by location, with the *same* linear classifier,
into per-location logits ``W F_hw + b``. Locations whose ground-truth-class probability is high are ID samples,
those where it is low (mostly background) are OOD samples, and a small binary OOD head learns to tell them apart
(the paper's self-supervised sampling). The paper factorises ``P(i | x) = P(i | x in ID, x) * P(x in ID | x)``;
at test time the OOD head on the pooled feature gives ``P_ID = P(x in ID | x)``.

OOD head convention: two logits, index :data:`OOD_INDEX` (0) = OOD and :data:`ID_INDEX` (1) = ID; ID locations
are the positive "ID" class (label 1), OOD locations label 0.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.nets.timm_net import TimmNet

#: Index of the OOD head's "out of distribution" logit (label of OOD locations).
OOD_INDEX = 0
#: Index of the OOD head's "in distribution" logit (label of ID locations): the positive class.
ID_INDEX = 1
#: The smallest final feature map SSOD accepts (side, in locations).
MIN_MAP_SIDE = 2

OODHead = Literal["conv1x1", "mlp"]
#: What a batch with only one kind of location (ID or OOD) contributes to the OOD term (:func:`ssod_loss`).
Unpaired = Literal["skip_batch", "skip_term"]


class SSODForward(NamedTuple):
    """One forward pass of :class:`SSODNet`.

    Attributes:
        logits: ``[B, K]`` the classifier on the pooled feature, ``W f + b``.
        features: ``[B, D]`` the pooled feature ``f`` (the backbone's pre-logits).
        ood_logits: ``[B, 2]`` the OOD head on the pooled feature (``softmax(.)[:, ID_INDEX]`` = P_ID).
        location_logits: ``[B, h, w, K]`` the same classifier at every location, or ``None`` (not asked for).
        location_ood_logits: ``[B, h, w, 2]`` the OOD head at every location, or ``None``.
    """

    logits: Tensor
    features: Tensor
    ood_logits: Tensor
    location_logits: Tensor | None = None
    location_ood_logits: Tensor | None = None


class SSODLoss(NamedTuple):
    """The terms of :func:`ssod_loss` (scalars; ``n_id`` / ``n_ood`` are location counts of the batch)."""

    loss: Tensor
    ce: Tensor
    ood: Tensor
    n_id: Tensor
    n_ood: Tensor


def make_ood_head(dim: int, kind: OODHead = "conv1x1", hidden: int = 256) -> nn.Module:
    """The binary OOD head on ``[N, dim]`` vectors -> ``[N, 2]`` logits.

    ``"conv1x1"``: one linear layer (a 1x1 convolution over the map, applied location by location);
    ``"mlp"``: ``dim -> hidden -> 2`` with a ReLU (the paper's C -> 256 -> 2 MLP).
    """
    if kind == "conv1x1":
        return nn.Linear(dim, 2)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))
    raise ValueError(f"model.ood_head must be 'conv1x1' or 'mlp', got {kind!r}")


class SSODNet(nn.Module):
    """A convolutional timm classifier plus the OOD head, read pooled and location by location.

    Each location ``F_hw`` (``[C]``) goes through the backbone's own pre-logits head as a 1 x 1 map (for a ResNet:
    the identity, so the location feature is ``F_hw`` itself and the mean of the location logits equals the
    pooled logits), then through the classifier ``W, b`` and the OOD head.

    Args:
        backbone: a :class:`TimmNet` over a CNN whose ``forward_features`` gives ``[B, C, h, w]``.
        ood_head: ``"conv1x1"`` or ``"mlp"`` (see :func:`make_ood_head`).
        ood_hidden: hidden width of the ``"mlp"`` head.
    """

    def __init__(self, backbone: TimmNet, ood_head: OODHead = "conv1x1", ood_hidden: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.ood_head = make_ood_head(backbone.head.in_features, ood_head, ood_hidden)

    @property
    def head(self) -> nn.Linear:
        """The linear classifier ``W: [K, D]``, ``b: [K]`` shared by the pooled feature and every location."""
        return self.backbone.head

    def feature_map(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> the last feature map ``[B, C, h, w]``."""
        fmap = self.backbone.forward_features(x)
        if fmap.ndim != 4:
            raise ValueError(
                f"SSOD needs a convolutional backbone whose forward_features gives [B, C, h, w]; got shape "
                f"{tuple(fmap.shape)} (a ViT's tokens?). Use a CNN such as resnet10t_os4, resnet18_os4, resnet50"
            )
        return fmap

    def location_features(self, fmap: Tensor) -> Tensor:
        """``[B, C, h, w]`` -> ``[B, h, w, D]``: each location through the pre-logits head as a 1 x 1 map."""
        b, c, h, w = fmap.shape
        cells = fmap.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        return self.backbone.pool(cells).reshape(b, h, w, -1)

    def forward(self, x: Tensor, locations: bool = False) -> SSODForward:
        """One pass; ``locations=True`` adds the per-location logits (training, mask pictures)."""
        fmap = self.feature_map(x)
        features = self.backbone.pool(fmap)
        out = SSODForward(self.head(features), features, self.ood_head(features))
        if not locations:
            return out
        cells = self.location_features(fmap)
        return out._replace(location_logits=self.head(cells), location_ood_logits=self.ood_head(cells))


@torch.no_grad()
def location_masks(location_logits: Tensor, labels: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """ID and OOD location masks, ``([B, h, w], [B, h, w])`` bool, computed without gradient.

    With ``p_hw = softmax(W F_hw + b)_y`` the probability of the image's class ``y`` at location ``hw``
    (the paper's sampling rule): ID where ``p_hw >= gamma``, OOD where ``p_hw <= 1 - gamma``, neither (ignored)
    in between.

    Args:
        location_logits: ``[B, h, w, K]``.
        labels: ``[B]`` class indices ``y`` in ``[0, K)``.
        gamma: threshold in ``(0.5, 1)``, so that no location is both.
    """
    probs = location_logits.float().softmax(dim=-1)
    index = labels.view(-1, 1, 1, 1).expand(*probs.shape[:3], 1)
    p_true = probs.gather(-1, index).squeeze(-1)
    return p_true >= gamma, p_true <= 1.0 - gamma


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; ``0`` (still in the graph, so DDP sees every parameter) when empty."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def ssod_loss(
    out: SSODForward,
    targets: Tensor,
    gamma: float = 0.95,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    unpaired: Unpaired = "skip_batch",
) -> SSODLoss:
    """The SSOD training loss of one batch (the paper's joint objective).

    ``L = CE(W f + b, y) + alpha * 1/2 * [mean_{ID locations} CE(g(F_hw), ID) + mean_{OOD locations} CE(g(F_hw),
    OOD)]`` with ``g`` the OOD head and the masks of :func:`location_masks`. Never a NaN: an empty mean is 0.
    A batch with ID but no OOD locations, or OOD but no ID ones (``unpaired``):

    - ``"skip_batch"`` (default): contributes no OOD term at all, so the head only ever learns from batches
      holding both kinds, with both halves weighted equally;
    - ``"skip_term"``: contributes the half of the kind it has (weight ``alpha / 2``).

    Args:
        out: a :class:`SSODForward` with the location outputs.
        targets: ``[B]`` class indices.
        gamma: mask threshold; alpha: weight of the OOD term; label_smoothing: of the pooled cross-entropy.
        unpaired: ``"skip_batch"`` or ``"skip_term"``, see above.
    """
    if out.location_logits is None or out.location_ood_logits is None:
        raise ValueError("ssod_loss needs the per-location outputs: call SSODNet(x, locations=True)")
    ce = F.cross_entropy(out.logits, targets, label_smoothing=label_smoothing)
    id_mask, ood_mask = location_masks(out.location_logits, targets, gamma)
    log_p = out.location_ood_logits.float().log_softmax(dim=-1)  # [B, h, w, 2]
    id_term = _masked_mean(-log_p[..., ID_INDEX], id_mask)
    ood_term = _masked_mean(-log_p[..., OOD_INDEX], ood_mask)
    ood = 0.5 * (id_term + ood_term)
    if unpaired == "skip_batch":  # multiplied by 0 rather than dropped: the head stays in the graph (DDP)
        ood = torch.where(id_mask.any() & ood_mask.any(), ood, ood * 0.0)
    elif unpaired != "skip_term":
        raise ValueError(f"unpaired must be 'skip_batch' or 'skip_term', got {unpaired!r}")
    return SSODLoss(ce + alpha * ood, ce, ood, id_mask.sum(), ood_mask.sum())


def feature_map_size(backbone: TimmNet, in_chans: int, img_size: int) -> tuple[int, int]:
    """``(h, w)`` of the backbone's last feature map for ``img_size`` px inputs (one dummy pass, eval mode)."""
    was_training = backbone.training
    param = next(backbone.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
    backbone.eval()
    try:
        with torch.no_grad():
            fmap = backbone.forward_features(x)
    finally:
        backbone.train(was_training)
    if fmap.ndim != 4:
        raise ValueError(
            f"SSOD needs a convolutional backbone whose forward_features gives [B, C, h, w]; got shape "
            f"{tuple(fmap.shape)} (a ViT's tokens?). Use a CNN such as resnet10t_os4, resnet18_os4, resnet50"
        )
    return int(fmap.shape[-2]), int(fmap.shape[-1])


def check_map_size(size: tuple[int, int], backbone: str, img_size: int, key: str) -> None:
    """Fail when the final map is smaller than 2 x 2, naming the size and how to get a bigger one."""
    if min(size) >= MIN_MAP_SIDE:
        return
    raise ValueError(
        f"SSOD samples ID / OOD locations from the backbone's last feature map, but {backbone!r} leaves a "
        f"{size[0]}x{size[1]} map on {img_size} px inputs ({key}); it needs at least "
        f"{MIN_MAP_SIDE}x{MIN_MAP_SIDE} (7x7 or more is better). Use a backbone with a smaller total stride "
        "(resnet10t_os4 or resnet18_os4: stride 4, 28 px -> 7x7; or a stock timm ResNet with "
        "backbone_kwargs: {output_stride: 8}), or larger images (data.image_size)"
    )
