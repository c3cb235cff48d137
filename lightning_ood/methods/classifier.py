"""The baseline: a timm classifier trained with cross-entropy, scored by post-hoc detectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_ood.contract import ModelOutputs
from lightning_ood.detectors.base import Detector
from lightning_ood.methods.supervised import SupervisedMethod
from lightning_ood.nets.timm_net import TimmNet, create_timm_model


class Classifier(SupervisedMethod):
    """Any timm backbone trained with cross-entropy on the ID classes; OOD scores are post-hoc detectors.

    Args:
        backbone: timm model name (``timm.list_models()``), e.g. ``resnet18``, ``resnet10t``.
        num_classes: number of ID classes (linked from ``data.num_classes`` by the CLI).
        in_chans: input channels (linked from ``data.channels`` by the CLI).
        pretrained: load timm's pretrained weights for ``backbone`` (needs network access once).
        weights_path: a local weights file to start from instead (offline); takes precedence.
        backbone_kwargs: extra ``timm.create_model`` arguments (``drop_rate``, ``img_size``, ...).
        optimizer / scheduler: injected by the config (``class_path`` + ``init_args``).
        scheduler_interval: step the scheduler per ``"epoch"`` or per ``"step"``.
        label_smoothing: cross-entropy label smoothing (0 = plain CE).
        detectors: the post-hoc detectors scored at test time (``None``: every applicable one).
        detector_cache: cache fitted detector statistics beside the tested checkpoint.
    """

    method_name = "classifier"
    gives_feature_maps = True

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        in_chans: int = 3,
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
        self.net = TimmNet(
            create_timm_model(
                backbone,
                num_classes=num_classes,
                in_chans=in_chans,
                pretrained=pretrained,
                weights_path=weights_path,
                **(backbone_kwargs or {}),
            )
        )
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.init_detectors(detectors, detector_cache)

    @property
    def head(self) -> nn.Linear:
        return self.net.head

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """One pass; with the stage outputs as ``feature_maps`` when a configured detector needs them."""
        return self.net(x, feature_maps=self.wants_feature_maps)
