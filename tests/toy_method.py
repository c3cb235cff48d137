"""Toy methods that exercise the whole method contract; ``ToyEncoder`` is the README's worked example."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_ood.contract import ID_KEY, OUTLIER_KEY, ModelOutputs
from lightning_ood.detectors import Detector
from lightning_ood.frozen import load_method
from lightning_ood.methods import OODMethod, SupervisedMethod
from lightning_ood.optim import configure_optimizers


class ToyEncoder(OODMethod):
    """A small encoder trained to give ID images a small feature norm and auxiliary outliers a large one.

    No classifier (no logits: logit detectors refuse it, no ``id_acc``), its own score ``feature_norm`` (higher =
    more OOD), trained with auxiliary outliers, best checkpoint by the lowest validation loss.
    """

    method_name = "toy_encoder"
    checkpoint_monitor = ("val/loss", "min")
    uses_outliers = True

    def __init__(
        self,
        num_classes: int = 10,  # linked from the data; unused: the encoder does not classify
        in_chans: int = 1,
        width: int = 8,
        margin: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        detectors: Sequence[Detector] | None = None,
        detector_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["detectors"])
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, width),
        )
        self.optimizer = optimizer
        self.init_detectors(detectors, detector_cache)

    @property
    def classifies(self) -> bool:
        return False

    @property
    def native_score_names(self) -> tuple[str, ...]:
        return ("feature_norm",)

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        return ModelOutputs(features=self.net(x))

    def native_scores(self, outputs: ModelOutputs, inputs: Tensor) -> dict[str, Tensor]:
        return {"feature_norm": outputs.features.norm(dim=1)}

    def loss(self, images: Tensor, outliers: Tensor | None = None) -> Tensor:
        loss = self.net(images).norm(dim=1).pow(2).mean()
        if outliers is not None:
            loss = loss + F.relu(self.hparams.margin - self.net(outliers).norm(dim=1)).pow(2).mean()
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        (images, _), (outliers, _) = batch[ID_KEY], batch[OUTLIER_KEY]
        loss = self.loss(images, outliers)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, _ = batch
        self.log("val/loss", self.loss(images), on_epoch=True, sync_dist=True, batch_size=len(images))

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.optimizer, None, "epoch")


class FrozenProbe(SupervisedMethod):
    """A linear probe trained on a frozen lightning-ood classifier's features (loaded from its checkpoint)."""

    method_name = "frozen_probe"

    def __init__(
        self,
        classifier_ckpt: str,
        num_classes: int = 10,
        in_chans: int = 1,
        optimizer: OptimizerCallable = torch.optim.Adam,
        detectors: Sequence[Detector] | None = None,
        detector_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["detectors"])
        frozen = self.register_frozen("classifier", load_method(classifier_ckpt), source=classifier_ckpt)
        self.probe = nn.Linear(frozen.head.in_features, num_classes)
        self.optimizer = optimizer
        self.init_detectors(detectors, detector_cache)

    @property
    def head(self) -> nn.Linear:
        return self.probe

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        features = self.classifier.forward_outputs(x).features
        return ModelOutputs(logits=self.probe(features), features=features)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        assert not self.classifier.training, "a frozen sub-model must stay in eval mode while training"
        return super().training_step(batch, batch_idx)


class RecordingToy(ToyEncoder):
    """``ToyEncoder`` that writes, per rank and epoch, what its training steps received (for the tests)."""

    def __init__(self, record_dir: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record_dir = record_dir
        self.seen: dict[str, list] = {
            "id_sizes": [],
            "outlier_sizes": [],
            "outlier_hashes": [],
            "targets": [],
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        (images, _), (outliers, out_targets) = batch[ID_KEY], batch[OUTLIER_KEY]
        self.seen["id_sizes"].append(len(images))
        self.seen["outlier_sizes"].append(len(outliers))
        self.seen["targets"] += out_targets.tolist()
        self.seen["outlier_hashes"] += [hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest() for x in outliers]
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        import json
        from pathlib import Path

        path = Path(self.record_dir) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = {k: [] for k in self.seen}


class UnmonitoredToy(ToyEncoder):
    """``ToyEncoder`` declaring no validation metric: the last checkpoint is tested."""

    checkpoint_monitor = None
