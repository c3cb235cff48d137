"""``SupervisedMethod``: the training and validation steps of a network trained with cross-entropy."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_ood.methods.base import OODMethod
from lightning_ood.nets.timm_net import TimmNet
from lightning_ood.optim import configure_optimizers


class SupervisedMethod(OODMethod):
    """A method whose network is trained with cross-entropy on the ID classes, its best checkpoint chosen by ID
    validation accuracy.

    Subclasses set ``self.optimizer`` / ``self.scheduler`` (injected callables) and save the hyperparameters
    ``scheduler_interval`` and, optionally, ``label_smoothing``.
    """

    checkpoint_monitor = ("val/acc", "max")

    @property
    def ready_without_training(self) -> bool:
        """True when the head came with the weights: a timm network (``self.net``) built from timm's pretrained
        weights or ``weights_path`` for exactly ``num_classes`` classes (e.g. an ImageNet classifier evaluated on
        ImageNet). Otherwise the head is random until trained, and ``evaluate.py`` needs a checkpoint."""
        net = getattr(self, "net", None)
        loaded = bool(self.hparams.get("pretrained")) or self.hparams.get("weights_path") is not None
        return loaded and isinstance(net, TimmNet) and net.head_matches_weights(self.hparams.num_classes)

    def cross_entropy_step(self, logits: Tensor, targets: Tensor, stage: str) -> Tensor:
        """Cross-entropy on the ID classes, logging ``<stage>/loss`` and ``<stage>/acc`` (epoch means, synced)."""
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.get("label_smoothing", 0.0))
        acc = (logits.argmax(dim=1) == targets).float().mean()
        on_step = stage == "train"
        n = len(targets)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            sync_dist=not on_step,
            batch_size=n,
        )
        self.log(
            f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n
        )
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        return self.cross_entropy_step(self.forward_outputs(images).logits, targets, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self.cross_entropy_step(self.forward_outputs(images).logits, targets, "val")

    def configure_optimizers(self) -> Any:
        return configure_optimizers(
            self,
            self.optimizer,
            getattr(self, "scheduler", None),
            self.hparams.get("scheduler_interval", "epoch"),
        )
