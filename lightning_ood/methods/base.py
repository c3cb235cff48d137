"""``OODMethod``: the contract every lightning-ood method fits (README, "Extending -> a method").

A method is a LightningModule that runs its network once per test batch (:meth:`OODMethod.forward_outputs`)
and hands the outputs to every configured detector and to its own scores (:meth:`OODMethod.native_scores`).
It may classify or not, may train with auxiliary outliers, may hold heavy frozen sub-models, and says what
its best checkpoint is chosen by. Detectors and frozen sub-models are not training state: they are not in the
optimiser and not in the method's checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_ood.contract import CONSUMABLES, DetectorInputs, ModelOutputs, TestStepOutput
from lightning_ood.derived_state import Stamps, stamp
from lightning_ood.detectors.base import Detector, begin_scoring
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.frozen import drop_unsaved_state, file_sha256, freeze, keep_unsaved_state
from lightning_ood.methods.detector_fitting import DetectorFitting
from lightning_ood.precision import full_precision, promote_head, promote_outputs

_NAME = re.compile(r"^[a-z0-9_]+$")


class OODMethod(DetectorFitting, LightningModule):
    """Base LightningModule of an OOD method.

    A subclass calls ``super().__init__()``, builds its network, and calls :meth:`init_detectors` at the end of
    its ``__init__``. It implements :meth:`forward_outputs` (one forward pass -> :class:`ModelOutputs`) and,
    where it applies, :attr:`head`, :attr:`classifies`, :attr:`native_score_names` / :meth:`native_scores`,
    ``training_step`` / ``validation_step``. The base class provides the test and predict steps (every detector
    and native score from the one forward pass), the detector fit pass over the ID training set with its cache
    beside the tested checkpoint (:class:`~lightning_ood.methods.detector_fitting.DetectorFitting`), frozen
    sub-models, and the optimiser from injected callables.

    Class attributes a method sets:
        method_name: short name in result tables and experiment tracking.
        checkpoint_monitor: ``(logged key, "min" | "max")`` the best checkpoint is chosen by (the CLI's
            ``checkpoint.monitor: auto`` follows it); ``None``: no validation metric, the last checkpoint is
            tested.
        uses_outliers: training batches are ``{"id": (images, targets), "outliers": (images, -1)}`` with
            auxiliary outliers from the datamodule's ``aux_set`` (sharded under DDP); otherwise ``(images,
            targets)`` and the outlier set is never built.
        gives_feature_maps: :meth:`forward_outputs` returns ``ModelOutputs.feature_maps`` when a configured
            detector requires them (:attr:`wants_feature_maps`); otherwise such detectors are refused by name.
    """

    method_name: ClassVar[str] = "method"
    checkpoint_monitor: ClassVar[tuple[str, str] | None] = ("val/acc", "max")
    uses_outliers: ClassVar[bool] = False
    #: :meth:`forward_outputs` fills ``ModelOutputs.feature_maps`` when a detector requires ``feature_maps``.
    gives_feature_maps: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._unsaved: list[str] = []  # child modules left out of state_dict (detectors, frozen sub-models)
        self._frozen: dict[str, dict[str, str]] = {}  # frozen child -> {"path", "sha256"} ({} without a file)
        self.detector_cache = True
        #: what each derived artefact (``detector/<name>``, ...) was computed from (``lightning_ood.derived_state``)
        self._derived: Stamps = {}
        self.register_state_dict_post_hook(drop_unsaved_state)
        self.register_load_state_dict_pre_hook(keep_unsaved_state)

    # -- what subclasses provide ---------------------------------------------------------------------------
    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """One forward pass: ``ModelOutputs(logits [B, C] or None, features [B, D], extras)``."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Linear | None:
        """The final linear layer mapping ``features`` to ``logits``, if the method has one."""
        return None

    @property
    def classifies(self) -> bool:
        """Whether :meth:`forward_outputs` gives class logits. Without them: no logit detectors, no ``id_acc``."""
        return True

    @property
    def native_score_names(self) -> tuple[str, ...]:
        """Names of the method's own scores (:meth:`native_scores`), known at construction."""
        return ()

    def native_scores(self, outputs: ModelOutputs, inputs: Tensor) -> dict[str, Tensor]:
        """The method's own ``[B]`` scores (higher = more OOD) from the test step's forward pass.

        ``outputs`` are the pass's outputs promoted to float32 or better; the call runs outside autocast.
        Must return exactly the keys of :attr:`native_score_names`.
        """
        return {}

    @property
    def ready_without_training(self) -> bool:
        """Whether the method can be evaluated without a trained checkpoint (a frozen pretrained model)."""
        return False

    @property
    def provides(self) -> frozenset[str]:
        """What detectors may consume from this method (see :data:`~lightning_ood.contract.CONSUMABLES`)."""
        out = CONSUMABLES
        if not self.classifies:
            out -= {"logits"}
        if self.head is None:
            out -= {"head"}
        if not self.gives_feature_maps:
            out -= {"feature_maps"}
        return out

    @property
    def run_config(self) -> dict[str, Any]:
        """Method-level facts for result tables and experiment tracking (method, backbone, ...)."""
        return {"method": self.method_name, "backbone": str(self.hparams.get("backbone", ""))}

    def forward(self, x: Tensor) -> ModelOutputs:
        return self.forward_outputs(x)

    # -- detectors -------------------------------------------------------------------------------------------
    def init_detectors(self, detectors: Sequence[Detector] | None, detector_cache: bool = True) -> None:
        """Validate and register the detectors (``None``: every detector applicable to this method)."""
        dets = list(detectors) if detectors is not None else default_detectors(self.provides)
        native = list(self.native_score_names)
        if not dets and not native:
            raise ValueError("model.detectors is empty: configure at least one detector (or leave it unset).")
        for name in native:
            if not _NAME.match(name) or native.count(name) > 1:
                raise ValueError(
                    f"{type(self).__name__}: native score names must be unique snake_case: {native}"
                )
        seen: set[str] = set()
        for det in dets:
            if not isinstance(det, Detector):
                raise TypeError(f"model.detectors must hold Detector instances, got {type(det).__name__}")
            if not _NAME.match(det.name):
                raise ValueError(f"detector name {det.name!r} must be lower-case letters, digits and '_'")
            if det.name in seen:
                raise ValueError(
                    f"two detectors are named {det.name!r}; give one a distinct `name` in its init_args"
                )
            if det.name in native:
                raise ValueError(
                    f"detector {det.name!r} ({type(det).__name__}) has the name of {type(self).__name__}'s own "
                    f"score {det.name!r}; give the detector another `name` in its init_args"
                )
            seen.add(det.name)
            det.check_applicable(self.provides)
        self.detectors = nn.ModuleDict({d.name: d for d in dets})
        self._unsaved.append("detectors")
        self.detector_cache = detector_cache

    @property
    def wants_feature_maps(self) -> bool:
        """Whether a configured detector consumes ``feature_maps`` (the forward pass computes them only then)."""
        detectors = self.__dict__.get("_modules", {}).get("detectors")
        return detectors is not None and any("feature_maps" in d.requires for d in detectors.values())

    @property
    def score_names(self) -> list[str]:
        """Every score of the test step, in result order: the detectors, then the method's own scores."""
        return [*self.detectors.keys(), *self.native_score_names]

    def reset_detectors(self) -> None:
        """Forget fitted statistics and what they were computed from (training is about to change the weights)."""
        for det in self.detectors.values():
            det.reset()
            stamp(self._derived, f"detector/{det.name}", None)

    # -- frozen sub-models -----------------------------------------------------------------------------------
    def register_frozen(self, name: str, module: nn.Module, source: str | Path | None = None) -> nn.Module:
        """Hold ``module`` as a frozen sub-model under attribute ``name``; returns it.

        Frozen: no gradients and never in the optimiser, always in eval mode (also while the method trains),
        moved to the device with the method, and left out of the method's checkpoints. ``source``: the file it
        was loaded from; its path and SHA-256 are written into the method's checkpoints instead, and loading
        such a checkpoint fails when the file's content has changed since.
        """
        self.add_module(name, freeze(module))
        self._unsaved.append(name)
        self._frozen[name] = {"path": str(source), "sha256": file_sha256(source)} if source else {}
        return module

    def train(self, mode: bool = True) -> OODMethod:
        super().train(mode)
        for name in self._frozen:
            getattr(self, name).eval()
        return self

    # -- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_ood_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["lightning_ood_frozen"] = {k: v for k, v in self._frozen.items() if v}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Statistics fitted for other weights are not reset here: the fit key (the weights' content) tells at the
        # next test start, so reloading the same weights reuses them.
        for name, ref in checkpoint.get("lightning_ood_frozen", {}).items():
            mine = self._frozen.get(name)
            if mine and mine["sha256"] != ref["sha256"]:
                raise ValueError(
                    f"frozen sub-model {name!r}: the checkpoint was trained with {ref['path']} (sha256 "
                    f"{ref['sha256'][:12]}), but the configured {mine['path']} has sha256 {mine['sha256'][:12]}; "
                    "point the config at the file the checkpoint was trained with"
                )

    def on_fit_start(self) -> None:
        # Training changes the weights every fitted statistic was computed from (the fit key would tell too; this
        # frees their memory while training).
        self.reset_detectors()

    # -- what the detectors read (the fit pass itself: DetectorFitting) --------------------------------------
    def _inputs_from(self, out: ModelOutputs, images: Tensor) -> tuple[DetectorInputs, ModelOutputs]:
        """What the detectors read from one forward pass, promoted to float32 or better (call outside autocast)."""
        out = promote_outputs(out)
        self._check_outputs(out)
        return DetectorInputs.from_outputs(out, head=promote_head(self.head), inputs=images, model=self), out

    def _check_outputs(self, out: ModelOutputs) -> None:
        if self.classifies and out.logits is None:
            raise RuntimeError(
                f"{type(self).__name__}.forward_outputs gave no logits, but the method classifies"
            )
        if not self.classifies and out.logits is not None:
            raise RuntimeError(
                f"{type(self).__name__}.forward_outputs gave logits, but its `classifies` is False: return "
                "logits=None, or make `classifies` True"
            )

    # -- testing and predicting ------------------------------------------------------------------------------
    def _prepare_scoring(self) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        for det in self.detectors.values():
            det.configure(datamodule)
        self.fit_detectors()

    def _begin_scoring(self, num_batches: Sequence[int | float]) -> None:
        """Detectors with a sharded fit (KNN under DDP) agree on how many batches the ranks will score."""
        begin_scoring(list(self.detectors.values()), sum(num_batches))

    def on_test_start(self) -> None:
        self._prepare_scoring()
        self._begin_scoring(self.trainer.num_test_batches)

    def on_predict_start(self) -> None:
        self._prepare_scoring()
        self._begin_scoring(self.trainer.num_predict_batches)

    def score_batch(self, images: Tensor, targets: Tensor) -> TestStepOutput:
        """Every detector and native score of one batch from ONE forward pass, as float64 ``[B]`` tensors.

        The forward pass runs in the caller's precision context; scoring runs outside autocast on outputs
        promoted to float32 or better, so a ``bf16-mixed`` trainer does not degrade the scores. An empty batch
        (a DDP rank with no image of a set) gives empty scores without a forward pass.
        """
        if len(images) == 0:
            for det in self.detectors.values():  # a detector scoring with collectives still takes its round
                det.empty_round()
            empty = torch.empty(0, dtype=torch.float64, device=images.device)
            preds = torch.empty(0, dtype=torch.long, device=images.device) if self.classifies else None
            return TestStepOutput(scores=dict.fromkeys(self.score_names, empty), preds=preds, targets=targets)
        out = self.forward_outputs(images)
        with full_precision(images.device):
            inputs, out = self._inputs_from(out, images)
            scores = {name: det(inputs) for name, det in self.detectors.items()}
            native = self.native_scores(out, images)
        if set(native) != set(self.native_score_names):
            raise RuntimeError(
                f"{type(self).__name__}.native_scores returned {sorted(native)}, but native_score_names is "
                f"{list(self.native_score_names)}"
            )
        scores.update(native)
        for name, value in scores.items():
            if value.shape != (len(images),):
                raise RuntimeError(f"score {name!r} has shape {tuple(value.shape)}, expected [{len(images)}]")
        scores = {name: value.detach().to(torch.float64) for name, value in scores.items()}
        preds = out.logits.argmax(dim=1) if out.logits is not None else None
        return TestStepOutput(scores=scores, preds=preds, targets=targets)

    def test_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> TestStepOutput:
        images, targets = batch
        return self.score_batch(images, targets)

    def predict_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> TestStepOutput:
        images, targets = batch
        return self.score_batch(images, targets)
