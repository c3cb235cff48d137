"""OODformer (Koner et al., BMVC 2021, arXiv 2107.08976): a ViT fine-tuned with cross-entropy, scored from [CLS].

The network is any class-token timm ViT / DeiT; the embedding ``z`` (``[B, D]``) is the [CLS] token after the
encoder's final LayerNorm and the logits are a linear head on it. OOD scores (higher = more OOD) are the paper's
softmax confidence and class-conditioned latent distances, all with the *nearest* class for every sample (the
released code scores ID test samples against their ground-truth class, which leaks labels):

- ``msp``: ``-max_c softmax(W z + b)_c``;
- ``class_mean_euclidean``: ``min_c ||z - mu_c||^2``;
- ``class_mean_cosine``: ``-max_c cos(z, mu_c)``;
- ``mahalanobis_tied``: ``min_c (z - mu_c)^T Sigma^-1 (z - mu_c)``, one shared covariance (Lee et al., 2018);
- ``mahalanobis_class``: the same with one covariance per class (the paper's code).

Class statistics come from the ID training set through eval transforms, in one streaming float64 pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_ood.contract import ModelOutputs
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.class_mean import ClassMeanCosine, ClassMeanEuclidean
from lightning_ood.detectors.logits import MSP
from lightning_ood.detectors.mahalanobis import Mahalanobis
from lightning_ood.methods.supervised import SupervisedMethod
from lightning_ood.nets.timm_net import create_timm_model
from lightning_ood.nets.vit import ViTNet
from lightning_ood.optim import WarmupOneCycleLR


def oodformer_detectors() -> list[Detector]:
    """OODformer's five scores (module docstring), each taking the minimum over classes."""
    return [
        MSP(),
        ClassMeanEuclidean(),
        ClassMeanCosine(),
        Mahalanobis(covariance="tied", name="mahalanobis_tied"),
        Mahalanobis(covariance="per_class", name="mahalanobis_class"),
    ]


class OODformer(SupervisedMethod):
    """A class-token ViT fine-tuned on the ID classes with cross-entropy; OOD scores from its [CLS] embedding.

    The paper's recipe (SGD, momentum 0.9, lr 0.01, weight decay 1e-5; :class:`WarmupOneCycleLR` with 500 warm-up
    steps, stepped per iteration; RandomResizedCrop(scale 0.2-1) + horizontal flip; best checkpoint by ID
    validation accuracy) is spelled out in ``configs/model/oodformer_*.yaml`` and the data configs' transforms.

    Args:
        backbone: timm ViT / DeiT name, e.g. ``vit_base_patch16_224.orig_in21k_ft_in1k``,
            ``deit_small_patch16_224``, ``vit_tiny_patch16_224``. Must pool the [CLS] token
            (``global_pool="token"``, the default; anything else in ``backbone_kwargs`` is an error).
        num_classes: number of ID classes (linked from ``data.num_classes``).
        in_chans: input channels (linked from ``data.channels``).
        img_size: the ViT's input side in pixels. With pretrained weights of another grid, timm resizes the
            position embeddings.
        patch_size: patch side; ``None`` keeps the backbone's (with pretrained weights of another patch size,
            timm resamples the patch embedding).
        resize_input: bilinearly resize every batch to ``img_size`` on the device before the ViT, so the data can
            stay small in memory (CIFAR at 32 px upsampled to 224 as in the paper; 50k CIFAR images stored at
            224 px would take 7.5 GB per process). ``False``: ``data.image_size`` must equal ``img_size``.
        pretrained: load timm's weights for ``backbone`` (needs network access once, or a populated cache).
        weights_path: a local weights file instead (offline, loaded by timm with the same adaptations).
        backbone_kwargs: further ``timm.create_model`` arguments (``depth``, ``embed_dim``, ``num_heads``,
            ``drop_path_rate``, ...).
        optimizer: injected; the configs set the paper's SGD (``torch.optim.SGD``'s own defaults otherwise).
        scheduler: injected; ``WarmupOneCycleLR(total_steps=None)`` takes its length from the trainer (see
            :mod:`lightning_ood.optim.schedules`); ``None``: constant learning rate.
        scheduler_interval: ``"step"`` (the paper) or ``"epoch"``; an unset ``total_steps`` then counts steps
            (``trainer.estimated_stepping_batches``) or epochs (``trainer.max_epochs``).
        detectors: scores computed at test time; ``None``: :func:`oodformer_detectors`.
        detector_cache: cache fitted detector statistics beside the tested checkpoint.
    """

    method_name = "oodformer"

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k",
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 224,
        patch_size: int | None = None,
        resize_input: bool = False,
        pretrained: bool = False,
        weights_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: LRSchedulerCallable | None = WarmupOneCycleLR,
        scheduler_interval: Literal["epoch", "step"] = "step",
        detectors: Sequence[Detector] | None = None,
        detector_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["detectors"])
        kwargs = dict(backbone_kwargs or {})
        for key in ("img_size", "patch_size", "num_classes", "in_chans"):
            if key in kwargs:
                raise ValueError(f"model.backbone_kwargs.{key}: set model.{key} instead")
        if kwargs.setdefault("global_pool", "token") != "token":
            raise ValueError(
                f"model.backbone_kwargs.global_pool={kwargs['global_pool']!r}: OODformer's embedding is the [CLS] "
                "token after the final LayerNorm, so global_pool must be 'token'"
            )
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        try:
            model = create_timm_model(
                backbone,
                num_classes=num_classes,
                in_chans=in_chans,
                pretrained=pretrained,
                weights_path=weights_path,
                img_size=img_size,
                **kwargs,
            )
        except TypeError as err:  # a non-ViT constructor rejects img_size / global_pool: say what is wrong
            raise ValueError(
                f"model.backbone={backbone!r}: OODformer needs a timm VisionTransformer (ViT / DeiT) that takes "
                f"img_size, patch_size and global_pool ({err})"
            ) from err
        self.net = ViTNet(model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.init_detectors(oodformer_detectors() if detectors is None else detectors, detector_cache)

    @property
    def head(self) -> nn.Linear:
        """The linear classifier on the [CLS] embedding (``W: [C, D]``)."""
        return self.net.head

    @property
    def run_config(self) -> dict[str, Any]:
        return {**super().run_config, "img_size": self.hparams.img_size}

    def _resize(self, x: Tensor) -> Tensor:
        size = self.hparams.img_size
        if not self.hparams.resize_input or x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """``x``: ``[B, C, H, W]`` -> ``ModelOutputs(logits [B, num_classes], features [B, D] post-norm [CLS])``."""
        return self.net(self._resize(x))

    def cls_attention(self, x: Tensor) -> Tensor:
        """``[B, grid_h, grid_w]`` attention-rollout map of the [CLS] token over the patches (see ``nets.vit``)."""
        return self.net.cls_attention(self._resize(x))

    def setup(self, stage: str) -> None:
        size = getattr(self.trainer.datamodule, "image_size", None)
        if not self.hparams.resize_input and size is not None and size != self.hparams.img_size:
            raise ValueError(
                f"model.img_size={self.hparams.img_size} but data.image_size={size}: set them equal (a ViT is "
                "built for one patch grid; timm resizes pretrained position embeddings to img_size), or set "
                "model.resize_input=true to upsample batches on the device"
            )
