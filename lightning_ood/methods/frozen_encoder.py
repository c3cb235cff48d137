"""Frozen pretrained encoders scored without any training on the ID data (Adaloglou et al., "Adapting
contrastive language-image pretrained (CLIP) models for out-of-distribution detection", TMLR 2024, arXiv
2303.05828).

A frozen encoder (timm, OpenCLIP, or a trained lightning-ood method's features) embeds every image once; OOD
scores on the embeddings ``z`` (``[B, D]``; higher = more OOD), fitted on the ID training set in one pass:

- ``knn``: ``-max_i cos(z, z_i)`` over the ID training embeddings (k = 1, label-free);
- ``mahalanobis``: tied-covariance Mahalanobis distance to the nearest class mean (labels);
- ``rmd``: relative Mahalanobis distance (labels);
- ``linear_probe``: ``-max softmax`` of a linear probe trained on the standardised embeddings (labels); the
  method then classifies with the probe and reports its ID accuracy;
- ``zero_shot`` (CLIP, ``zero_shot: true``): ``-max_c softmax(cos(P z, t_c) / tau)`` with ``t_c`` the class
  prompts' text embeddings and ``P`` the image projection (MCM, Ming et al., NeurIPS 2022); no labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.contract import ModelOutputs
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.knn import KNN
from lightning_ood.detectors.linear_probe import LinearProbe
from lightning_ood.detectors.mahalanobis import RMD, Mahalanobis
from lightning_ood.methods.base import OODMethod
from lightning_ood.methods.input_norm import InputNormalisation
from lightning_ood.nets.clip import PROMPT_TEMPLATES, ClipEncoder
from lightning_ood.nets.encoders import Encoder, prepare_input


def frozen_encoder_detectors() -> list[Detector]:
    """The paper's scores on frozen embeddings: k-NN (k = 1), tied Mahalanobis, RMD and the linear probe."""
    return [KNN(k=1), Mahalanobis(covariance="tied"), RMD(), LinearProbe()]


def zero_shot_score(image_embeddings: Tensor, text_embeddings: Tensor, temperature: float = 1.0) -> Tensor:
    """MCM score ``-max_c softmax(cos(e, t_c) / temperature)`` (Ming et al., NeurIPS 2022); higher = more OOD.

    Args:
        image_embeddings: ``[B, E]`` projected image embeddings (any norm; normalised here).
        text_embeddings: ``[C, E]`` L2-normalised class embeddings.
        temperature: ``tau`` (Adaloglou et al.'s code: 1 on raw cosines).

    Returns:
        ``[B]`` scores in ``[-1, -1/C]``.
    """
    cosines = F.normalize(image_embeddings, dim=-1) @ text_embeddings.to(image_embeddings).T
    return -(cosines / temperature).softmax(dim=1).amax(dim=1)


class FrozenEncoder(InputNormalisation, OODMethod):
    """A frozen pretrained encoder's embeddings scored by post-hoc detectors (module doc); nothing is trained.

    ``evaluate.py`` runs it without ``--ckpt_path`` (``ready_without_training``). The encoder's own
    preprocessing is applied exactly once to every batch, whatever the data config's normalisation (see
    :func:`~lightning_ood.nets.encoders.prepare_input`). The method classifies only through a
    :class:`~lightning_ood.detectors.LinearProbe` among its detectors (the first one): once the probe is fitted,
    ``logits`` are the probe's and its ID test accuracy is ``id_acc``; without a probe no ``id_acc`` is
    reported. Logit detectors (MSP, Energy, ...) are refused: the probe's MSP is the ``linear_probe`` score.

    Fitted statistics are cached beside the tested checkpoint when there is one, else beside the encoder's local
    weights file (``<file>.frozen_encoder.detectors.pt``) when its folder is writable; an encoder downloaded by
    name (timm ``pretrained: true``, an OpenCLIP tag without ``checkpoint``) is refitted on every run.

    Args:
        encoder: the frozen encoder (``class_path`` + ``init_args``): ``lightning_ood.nets.encoders.TimmEncoder``,
            ``lightning_ood.nets.encoders.CheckpointEncoder`` or ``lightning_ood.nets.clip.ClipEncoder``.
        num_classes, in_chans: linked from the data (``num_classes`` sizes the probe; channels are converted to
            the encoder's).
        zero_shot: add the ``zero_shot`` score (needs a ``ClipEncoder``); class names from ``class_names`` or
            the data (``datamodule.class_names``).
        temperature: the zero-shot softmax temperature ``tau``.
        templates: prompt templates with ``{c}``; ``None``: the paper's five.
        class_names: class names for the prompts (``None``: the data's, with ``_`` read as a space).
        input_mean, input_std: the normalisation of the batches this method receives (``None``: the data
            config's ``mean`` / ``std``, read when the trainer sets the method up).
        detectors: ``None``: :func:`frozen_encoder_detectors`.
        detector_cache: cache fitted statistics (see above).
    """

    method_name = "frozen_encoder"
    checkpoint_monitor = None  # nothing is trained

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int = 10,
        in_chans: int = 3,
        zero_shot: bool = False,
        temperature: float = 1.0,
        templates: list[str] | None = None,
        class_names: list[str] | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        detectors: Sequence[Detector] | None = None,
        detector_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "detectors"])
        if not isinstance(encoder, Encoder):
            raise TypeError(
                f"FrozenEncoder.encoder must be a lightning_ood Encoder, got {type(encoder).__name__}"
            )
        if zero_shot and not isinstance(encoder, ClipEncoder):
            raise ValueError(
                f"FrozenEncoder.zero_shot needs a ClipEncoder (a text tower), got {type(encoder).__name__}"
            )
        if temperature <= 0:
            raise ValueError(f"FrozenEncoder.temperature must be > 0, got {temperature}")
        self.register_frozen("encoder", encoder, source=encoder.source)
        self.register_buffer("text_embeddings", torch.empty(0), persistent=False)  # [C, E] once computed
        dets = list(detectors) if detectors is not None else frozen_encoder_detectors()
        self.init_detectors(dets, detector_cache)

    # -- the contract -------------------------------------------------------------------------------------------
    @property
    def ready_without_training(self) -> bool:
        return True

    @property
    def probe(self) -> LinearProbe | None:
        """The first :class:`LinearProbe` among the detectors, if any."""
        return next((d for d in self.detectors.values() if isinstance(d, LinearProbe)), None)

    @property
    def classifies(self) -> bool:
        """True once a linear probe is fitted (its logits, its ``id_acc``); False before and without one."""
        probe = self.probe if hasattr(self, "detectors") else None
        return probe is not None and probe.fitted

    @property
    def native_score_names(self) -> tuple[str, ...]:
        return ("zero_shot",) if self.hparams.zero_shot else ()

    @property
    def run_config(self) -> dict[str, Any]:
        return {"method": self.method_name, "backbone": self.encoder.name}

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """``[B, C, H, W]`` batches (data normalisation) -> features ``[B, D]``, logits ``[B, K]`` once probed."""
        mean, std = self.input_normalisation(x)
        features = self.encoder(prepare_input(x, mean, std, self.encoder.input_spec))
        logits = self.probe.logits(features) if self.classifies else None
        return ModelOutputs(logits=logits, features=features)

    def native_scores(self, outputs: ModelOutputs, inputs: Tensor) -> dict[str, Tensor]:
        if not self.hparams.zero_shot:
            return {}
        return {
            "zero_shot": zero_shot_score(
                self.encoder.project(outputs.features), self.text_embeddings, self.hparams.temperature
            )
        }

    def zero_shot_logits(self, features: Tensor) -> Tensor:
        """``[B, C]`` cosines between the projected image embeddings and the class prompts (pseudo-labels)."""
        if not isinstance(self.encoder, ClipEncoder) or self.text_embeddings.numel() == 0:
            raise RuntimeError(
                "zero-shot logits need a ClipEncoder and its class prompts (computed when testing starts)"
            )
        projected = F.normalize(self.encoder.project(features), dim=-1)
        return projected @ self.text_embeddings.to(projected).T

    def _prepare_scoring(self) -> None:
        if self.hparams.zero_shot and self.text_embeddings.numel() == 0:
            self.text_embeddings = self.encoder.encode_prompts(self._class_names(), self._templates())
        super()._prepare_scoring()

    def _class_names(self) -> list[str]:
        if self.hparams.class_names:
            return list(self.hparams.class_names)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "class_names"):
            raise RuntimeError("zero-shot scoring needs class names: set model.init_args.class_names")
        return [name.replace("_", " ") for name in datamodule.class_names]  # CIFAR-100's "maple_tree"

    def _templates(self) -> tuple[str, ...]:
        return tuple(self.hparams.templates) if self.hparams.templates else PROMPT_TEMPLATES

    # -- the fit cache -------------------------------------------------------------------------------------------
    def cache_anchor(self) -> str | None:
        """Beside the tested checkpoint if any, else beside the encoder's weights file if its folder is writable
        (asked on rank 0 only, which decides for every rank)."""
        anchor = super().cache_anchor()
        source = self.encoder.source
        if anchor is None and self.detector_cache and source and os.access(Path(source).parent, os.W_OK):
            anchor = f"{source}.{self.method_name}"
        return anchor

    def fit_context(self) -> dict[str, Any]:
        """The base class's context, the encoder's settings and the zero-shot prompts."""
        return {
            **super().fit_context(),
            "encoder": self.encoder.describe(),
            "prompts": self._prompt_context(),
        }

    def _prompt_context(self) -> list[str]:
        return [*self._class_names(), *self._templates()] if self.hparams.zero_shot else []

    # -- nothing to train ----------------------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            "FrozenEncoder is not trained: evaluate it with evaluate.py (no --ckpt_path needed)"
        )

    def configure_optimizers(self) -> NoReturn:
        raise RuntimeError(
            "FrozenEncoder is not trained: evaluate it with evaluate.py (no --ckpt_path needed)"
        )
