"""What every lightning-ood method shares: detectors scored from one forward pass, and their fit pass."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ood.detectors.base import CONSUMABLES, Detector, DetectorInputs, ModelOutputs
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.methods.detector_fit import fit_detectors, load_cached, save_cache


class TestStepOutput(NamedTuple):
    """What a method's ``test_step`` returns (read by :class:`~lightning_ood.callbacks.OODEvaluation`).

    Attributes:
        scores: detector name -> ``[B]`` OOD scores (higher = more OOD), all from one forward pass.
        preds: ``[B]`` predicted class indices.
        targets: ``[B]`` ground-truth class indices (``-1`` for OOD samples).
    """

    scores: dict[str, Tensor]
    preds: Tensor
    targets: Tensor


_NAME = re.compile(r"^[a-z0-9_]+$")


class OODMethod(LightningModule):
    """Base LightningModule of an OOD method.

    A subclass builds its network, calls :meth:`init_detectors` at the end of ``__init__`` and implements
    :meth:`forward_outputs` (one forward pass -> logits and features) and :attr:`head`. The test step then runs
    the network once per batch and scores it with every configured detector. Detectors that need ID statistics
    are fitted in one streaming pass over the datamodule's ``fit_dataloader()`` when testing starts; when
    testing a checkpoint the fitted statistics are cached beside it (``<ckpt>.detectors.pt``) so a second
    evaluation does not refit.
    """

    #: Short method name used in result tables and experiment tracking.
    method_name: ClassVar[str] = "method"

    def init_detectors(self, detectors: Sequence[Detector] | None, detector_cache: bool = True) -> None:
        """Validate and register the detectors (``None``: every detector applicable to this method)."""
        dets = list(detectors) if detectors is not None else default_detectors(self.provides)
        if not dets:
            raise ValueError("model.detectors is empty: configure at least one detector (or leave it unset).")
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
            seen.add(det.name)
            det.check_applicable(self.provides)
        self.detectors = nn.ModuleDict({d.name: d for d in dets})
        self.detector_cache = detector_cache

    # -- what subclasses provide ---------------------------------------------------------------------------
    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """One forward pass: ``ModelOutputs(logits [B, C], features [B, D])``."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Linear | None:
        """The final linear layer mapping ``features`` to ``logits``, if the method has one."""
        return None

    @property
    def provides(self) -> frozenset[str]:
        """What detectors may consume from this method (see :data:`~lightning_ood.detectors.CONSUMABLES`)."""
        return CONSUMABLES if self.head is not None else CONSUMABLES - {"head"}

    @property
    def run_config(self) -> dict[str, Any]:
        """Method-level facts for result tables and experiment tracking (method, backbone, ...)."""
        return {"method": self.method_name, "backbone": str(self.hparams.get("backbone", ""))}

    def forward(self, x: Tensor) -> ModelOutputs:
        return self.forward_outputs(x)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The detector set is configuration, not training state: evaluating a checkpoint with other detectors
        # than it was trained with must work. Fitted statistics come from the cache or a fresh fit pass.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("detectors.")]:
            del state[key]
        state.update({f"detectors.{k}": v for k, v in self.detectors.state_dict().items()})

    # -- testing ---------------------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        self.fit_detectors()

    def fit_detectors(self) -> None:
        """Fit every detector that needs it, from the cache when possible, else in one pass over ID train."""
        todo = [d for d in self.detectors.values() if d.needs_fit and not d.fitted]
        if not todo:
            return
        trainer = self.trainer
        ckpt = trainer.ckpt_path if self.detector_cache else None
        # Every rank reads the cache itself: under multi-node DDP the checkpoint folder must be shared.
        use_cache = bool(ckpt)
        if use_cache:
            todo = load_cached(todo, ckpt)
            if not todo:
                rank_zero_info(f"Loaded fitted detector statistics from the cache beside {ckpt}")
                return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "fit_dataloader"):
            raise RuntimeError(
                f"detectors {[d.name for d in todo]} need ID training statistics, but the datamodule has no "
                "fit_dataloader(); use lightning_ood.data.OODDataModule or fit the detectors beforehand."
            )
        was_training = self.training
        self.eval()
        fit_detectors(
            self,
            todo,
            datamodule.fit_dataloader(),
            device=self.device,
            progress=trainer.is_global_zero,
            forward_context=trainer.precision_plugin.forward_context,
        )
        self.train(was_training)
        if use_cache and trainer.is_global_zero:
            rank_zero_info(f"Cached fitted detector statistics in {save_cache(todo, ckpt)}")
        trainer.strategy.barrier("lightning_ood_detector_fit")

    def test_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> TestStepOutput:
        images, targets = batch
        out = self.forward_outputs(images)
        inputs = DetectorInputs.from_outputs(out, head=self.head, inputs=images, model=self)
        scores = {name: det(inputs).float() for name, det in self.detectors.items()}
        return TestStepOutput(scores=scores, preds=out.logits.argmax(dim=1), targets=targets)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> TestStepOutput:
        return self.test_step(batch, batch_idx, dataloader_idx)
