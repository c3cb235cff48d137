"""SSOD (Pei et al., ICLR 2024, "Image Background Serves as Good Proxy for Out-of-distribution Data",
arXiv 2307.00519): classification and OOD detection trained jointly, end to end, with locations of the last
feature map as free ID / OOD samples.

The network and the maths are in :mod:`lightning_ood.nets.ssod`. Training minimises
``CE(W f + b, y) + alpha * 1/2 * [mean CE over ID locations + mean CE over OOD locations]``, the locations chosen
without gradient by the probability of the ground-truth class at each location (ID if ``>= gamma``, OOD if
``<= 1 - gamma``). The method's own scores (higher = more OOD), from the test step's one forward pass:

- ``ssod``: ``1 - MSP * P_ID`` (the paper's score), ``MSP = max_c softmax(W f + b)_c`` and ``P_ID`` the OOD head's
  ID probability on the pooled feature ``f``;
- ``ood_head``: ``1 - P_ID``, the OOD head alone.

MSP alone, and every other library detector (Energy, Mahalanobis, ViM, ...), apply to its logits, pooled feature
and linear head as to any classifier's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ood.contract import ModelOutputs
from lightning_ood.detectors.base import Detector
from lightning_ood.methods.supervised import SupervisedMethod
from lightning_ood.nets.ssod import (
    ID_INDEX,
    OOD_INDEX,
    OODHead,
    SSODNet,
    Unpaired,
    check_map_size,
    feature_map_size,
    location_masks,
    ssod_loss,
)
from lightning_ood.nets.timm_net import TimmNet, create_timm_model

#: Key of the OOD head's pooled logits (``[B, 2]``) in :attr:`ModelOutputs.extras`.
OOD_LOGITS = "ood_logits"


class SSOD(SupervisedMethod):
    """A convolutional timm classifier trained jointly with an OOD head on self-sampled ID / OOD locations.

    Args:
        backbone: timm CNN name. Its last feature map must have at least 2 x 2 locations (7 x 7 or more is
            better): ``resnet10t_os4`` / ``resnet18_os4`` (total stride 4: 28 px -> 7 x 7, 32 px -> 8 x 8, see
            :mod:`lightning_ood.nets.small_resnet`), or a stock ResNet at 224 px (``resnet50``: 7 x 7).
        num_classes: number of ID classes (linked from ``data.num_classes``).
        in_chans: input channels (linked from ``data.channels``).
        img_size: input side the map size is checked for at construction (one dummy pass); ``None``: checked
            only at ``setup``, for ``data.image_size`` (which is always checked).
        gamma: location threshold in ``(0.5, 1)``: ID if ``p_y >= gamma``, OOD if ``p_y <= 1 - gamma`` (paper:
            0.95; 0.99 also used).
        alpha: weight of the OOD term (paper: 0.1 or 1).
        ood_head: ``"conv1x1"`` (a 1x1 convolution: one linear layer per location) or ``"mlp"`` (C -> 256 -> 2).
        ood_hidden: hidden width of the ``"mlp"`` head.
        unpaired: a batch with ID but no OOD locations (or the reverse) contributes no OOD term
            (``"skip_batch"``), or the half of the kind it has (``"skip_term"``); see
            :func:`~lightning_ood.nets.ssod.ssod_loss`.
        pretrained / weights_path / backbone_kwargs: as for :class:`~lightning_ood.methods.Classifier`.
        optimizer / scheduler / scheduler_interval: injected by the config.
        label_smoothing: of the classification cross-entropy (0 = plain CE).
        detectors: library detectors scored besides ``ssod`` and ``ood_head`` (``None``: every applicable one).
        detector_cache: cache fitted detector statistics beside the tested checkpoint.
    """

    method_name = "ssod"

    def __init__(
        self,
        backbone: str = "resnet18_os4",
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | None = 32,
        gamma: float = 0.95,
        alpha: float = 1.0,
        ood_head: OODHead = "conv1x1",
        ood_hidden: int = 256,
        unpaired: Unpaired = "skip_batch",
        pretrained: bool = False,
        weights_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        label_smoothing: float = 0.0,
        detectors: Sequence[Detector] | None = None,
        detector_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["detectors"])
        if not 0.5 < gamma < 1.0:
            raise ValueError(
                f"model.gamma must be in (0.5, 1) so no location is both ID and OOD, got {gamma}"
            )
        if alpha < 0:
            raise ValueError(f"model.alpha must be >= 0, got {alpha}")
        if unpaired not in ("skip_batch", "skip_term"):
            raise ValueError(f"model.unpaired must be 'skip_batch' or 'skip_term', got {unpaired!r}")
        model = create_timm_model(
            backbone,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained=pretrained,
            weights_path=weights_path,
            **(backbone_kwargs or {}),
        )
        self.net = SSODNet(TimmNet(model), ood_head=ood_head, ood_hidden=ood_hidden)
        if img_size is not None:
            self.map_size = feature_map_size(self.net.backbone, in_chans, img_size)
            check_map_size(self.map_size, backbone, img_size, "model.img_size")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.init_detectors(detectors, detector_cache)

    # -- the method contract ---------------------------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:
        """The linear classifier ``W: [K, D]`` on the pooled feature (and, in training, on every location)."""
        return self.net.head

    @property
    def native_score_names(self) -> tuple[str, ...]:
        return ("ssod", "ood_head")

    @property
    def run_config(self) -> dict[str, Any]:
        hp = self.hparams
        return {**super().run_config, "gamma": hp.gamma, "alpha": hp.alpha, "ood_head": hp.ood_head}

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """``[B, C, H, W]`` -> logits ``[B, K]``, pooled features ``[B, D]``, extras ``{"ood_logits": [B, 2]}``."""
        out = self.net(x)
        return ModelOutputs(logits=out.logits, features=out.features, extras={OOD_LOGITS: out.ood_logits})

    def native_scores(self, outputs: ModelOutputs, inputs: Tensor) -> dict[str, Tensor]:
        """``ssod = 1 - MSP * P_ID`` and ``ood_head = 1 - P_ID`` (``[B]`` each, float64, higher = more OOD).

        Computed from log-probabilities (``1 - exp(log MSP + log P_ID)`` with ``expm1``), so confident ID images
        near 1 keep distinct scores instead of rounding to ties.
        """
        log_msp = outputs.logits.double().log_softmax(dim=1).amax(dim=1)
        log_p = outputs.extras[OOD_LOGITS].double().log_softmax(dim=1)
        return {"ssod": -torch.expm1(log_msp + log_p[:, ID_INDEX]), "ood_head": log_p[:, OOD_INDEX].exp()}

    # -- training --------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The joint loss (:func:`~lightning_ood.nets.ssod.ssod_loss`); logs the loss, its two terms, the
        training accuracy and the batch's numbers of ID and OOD locations."""
        images, targets = batch
        hp = self.hparams
        out = self.net(images, locations=True)
        terms = ssod_loss(out, targets, hp.gamma, hp.alpha, hp.get("label_smoothing", 0.0), hp.unpaired)
        acc = (out.logits.argmax(dim=1) == targets).float().mean()
        n = len(targets)
        step = {"on_step": True, "on_epoch": True, "batch_size": n}
        self.log("train/loss", terms.loss, prog_bar=True, **step)
        self.log("train/ce_loss", terms.ce, **step)
        self.log("train/ood_loss", terms.ood, **step)
        self.log("train/n_id_locations", terms.n_id.float(), **step)
        self.log("train/n_ood_locations", terms.n_ood.float(), **step)
        self.log("train/acc", acc, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        return terms.loss

    def setup(self, stage: str) -> None:
        """Check the map size for the data's image size (the one the network will really see)."""
        size = getattr(self.trainer.datamodule, "image_size", None) if self._trainer is not None else None
        if size is None:
            return
        self.map_size = feature_map_size(self.net.backbone, self.hparams.in_chans, size)
        check_map_size(self.map_size, self.hparams.backbone, size, "data.image_size")
        h, w = self.map_size
        rank_zero_info(f"SSOD: {h}x{w} = {h * w} locations per {size} px image on the last feature map")

    # -- pictures --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def location_maps(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(id_mask, ood_mask, p_id)``, each ``[B, h, w]``, for pictures of what is sampled as ID / OOD.

        ``labels``: ``[B]`` the class whose probability selects the locations; ``-1`` (an OOD test image, which
        has no class) uses the predicted class. ``p_id``: the OOD head's ID probability at each location.
        """
        out = self.net(x, locations=True)
        labels = torch.where(labels >= 0, labels, out.logits.argmax(dim=1))
        id_mask, ood_mask = location_masks(out.location_logits, labels, self.hparams.gamma)
        p_id = out.location_ood_logits.float().softmax(dim=-1)[..., ID_INDEX]
        return id_mask, ood_mask, p_id
