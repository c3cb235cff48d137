"""``DetectorFitting``: how an :class:`~lightning_ood.methods.OODMethod` fits its detectors.

The detector fit pass over the ID training set, what decides it (the fit plan: reuse the statistics in memory,
read them from the fit cache beside the tested checkpoint, or refit), and the fingerprints a fit is keyed by
(the weights' content, the fit data, the precision and the method's feature settings). A mixin of
:class:`~lightning_ood.methods.OODMethod`, which provides the detectors, the forward pass and the LightningModule
it needs; methods override :meth:`DetectorFitting.cache_anchor`, :meth:`DetectorFitting.fit_context`,
:meth:`DetectorFitting._describe` or :meth:`DetectorFitting.fit_detectors` where they fit differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_ood.contract import DetectorInputs
from lightning_ood.derived_state import fingerprint, module_fingerprint, rank_zero_decides, stamp
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.fitting import fit_detectors, read_cache, save_cache
from lightning_ood.detectors.shard_cache import load_shards, save_shards, shards_under_ddp
from lightning_ood.precision import full_precision

#: Hyperparameters that shape training only, not the features of given weights: left out of the fit cache key.
_NOT_FEATURE_SETTINGS = frozenset(
    {"detectors", "detector_cache", "optimizer", "scheduler", "scheduler_interval", "label_smoothing"}
)


class DetectorFitting:
    """Mixin of :class:`~lightning_ood.methods.OODMethod`: the detector fit pass, its cache and its fit key.

    Only :class:`~lightning_ood.methods.OODMethod` inherits it (before ``LightningModule``); its methods use the
    method's ``detectors``, ``detector_cache``, ``_derived`` stamps, frozen sub-models, forward pass and trainer.
    """

    def fit_detectors(self, batches: Iterable | None = None) -> None:
        """Fit every detector that needs it: reused, from the cache, or in one pass over ID train.

        ``batches``: ``(images, targets)`` ID training batches; every unfitted detector is fitted on them.
        Default: the datamodule's ``fit_dataloader()``; a fitted detector is reused only for the same
        :meth:`fit_key` and hyperparameters, else it comes from the cache (:meth:`cache_anchor`) or is refitted.
        Under DDP rank 0 decides and reads the cache; decision and cached states are broadcast. Batches go
        through Lightning's batch pipeline and precision context, as test batches do.
        """
        needs = [d for d in self.detectors.values() if d.needs_fit]
        if batches is not None or self._trainer is None:
            self._fit_pass([d for d in needs if not d.fitted], batches)
            for det in needs:
                stamp(
                    self._derived, f"detector/{det.name}", None
                )  # fitted on batches the key cannot describe
            return
        if not needs:
            return
        plan = rank_zero_decides(lambda: self._fit_plan(needs))
        key, anchor, fresh, cached = plan["key"], plan["anchor"], plan["fresh"], plan["cached"]
        if fresh:
            rank_zero_info(f"Using the fit of {fresh} (same weights, data and settings)")
        for name, state in cached.items():
            self.detectors[name].load_state_dict(state)
        # an entry that loads unfitted holds no complete fit (e.g. one rank's share of a sharded KNN bank)
        loaded = sorted(name for name in cached if self.detectors[name].fitted)
        if loaded:
            rank_zero_info(f"Using the cached fit of {loaded} from {anchor}.detectors.pt")
        todo = [d for d in needs if d.name not in fresh and d.name not in loaded]
        # sharded banks: each rank its own share of the cache (every rank enters, also without an anchor)
        shards = load_shards([d for d in todo if shards_under_ddp(d)], anchor, key)
        if shards:
            rank_zero_info(f"Using the cached shares of {shards} from {anchor}.detectors.rank*-of-*.pt")
        todo = [d for d in todo if d.name not in shards]
        self._fit_pass(todo, None)
        for det in needs:
            stamp(self._derived, f"detector/{det.name}", f"{key}/{det.fingerprint()}")
        if todo and anchor and self.trainer.is_global_zero:
            rank_zero_info(f"Cached fitted detector statistics in {save_cache(todo, anchor, key)}")
        if anchor and any(shards_under_ddp(d) for d in todo):
            save_shards([d for d in todo if shards_under_ddp(d)], anchor, key)
        if todo:
            self.trainer.strategy.barrier("lightning_ood_detector_fit")

    def _fit_plan(self, needs: list[Detector]) -> dict[str, Any]:
        """Rank 0's decision: fit key, cache anchor, detectors fitted for this key, cached states of others."""
        key = self.fit_key()
        stamps = self._derived
        fresh = [
            d.name
            for d in needs
            if d.fitted and stamps.get(f"detector/{d.name}") == f"{key}/{d.fingerprint()}"
        ]
        anchor = self.cache_anchor()
        # a sharded bank is not read from the one-process cache: broadcasting it would send N x D to every rank
        rest = [d for d in needs if d.name not in fresh and not shards_under_ddp(d)]
        cached = read_cache(anchor, key, rest) if anchor and rest else {}
        return {"key": key, "anchor": anchor, "fresh": fresh, "cached": cached}

    def _fit_pass(self, todo: list[Detector], batches: Iterable | None) -> None:
        if not todo:
            return
        trainer = self._trainer
        if batches is None:
            datamodule = trainer.datamodule if trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "fit_dataloader"):
                raise RuntimeError(
                    f"detectors {[d.name for d in todo]} need ID training statistics, but there is no datamodule "
                    "with fit_dataloader(); use lightning_ood.data.OODDataModule or pass the batches"
                )
            batches = datamodule.fit_dataloader()
        was_training = self.training
        self.eval()
        fit_detectors(todo, batches, self._describe, progress=trainer is None or trainer.is_global_zero)
        self.train(was_training)

    def adopt_fitted(self, detectors: dict[str, Detector], key: str) -> None:
        """Install ``detectors`` fitted for ``key`` (by the detector search), stamped so the test reuses them."""
        for name, det in detectors.items():
            self.detectors[name] = det
            stamp(self._derived, f"detector/{name}", f"{key}/{det.fingerprint()}")

    # -- fingerprints of the weights, the fit data and the settings ------------------------------------------
    def weights_fingerprint(self) -> str:
        """Content hash of the weights the method scores with: every parameter and buffer of its own, and each
        frozen sub-model by its file's SHA-256 when loaded from one, else by content. Detectors and other
        derived children (anything in ``_unsaved`` that is not a frozen sub-model) are left out."""
        derived = [n for n in self._unsaved if n not in self._frozen]
        by_file = {n: ref["sha256"] for n, ref in self._frozen.items() if ref}
        return fingerprint(own=module_fingerprint(self, skip=[*derived, *by_file]), frozen=by_file)

    def fit_context(self) -> dict[str, Any]:
        """Everything besides the weights that decides the features the detectors are fitted on: the fit images
        and how they look (``datamodule.fit_fingerprint()``), the precision, the method's class and its
        feature settings (hyperparameters that shape only training are left out)."""
        datamodule = self.trainer.datamodule
        data = datamodule.fit_fingerprint() if hasattr(datamodule, "fit_fingerprint") else repr(datamodule)
        method = {k: v for k, v in self.hparams.items() if k not in _NOT_FEATURE_SETTINGS}
        return {
            "data": data,
            "precision": str(self.trainer.precision),
            "method": type(self).__qualname__,
            "hparams": method,
        }

    def fit_key(self) -> str:
        """The fingerprint fitted statistics are computed from: the weights' content and :meth:`fit_context`.
        Fitted detectors in memory and the fit cache on disk are both used only under this key."""
        return fingerprint(weights=self.weights_fingerprint(), **self.fit_context())

    def cache_anchor(self) -> str | None:
        """Fitted statistics are cached in ``<anchor>.detectors.pt`` (``None``: no cache). Default: beside the
        tested checkpoint (``detector_cache`` on). Asked on rank 0 only."""
        trainer = self._trainer
        ckpt = trainer.ckpt_path if trainer is not None else None
        return ckpt if ckpt and self.detector_cache else None

    def _describe(self, batch: Any) -> tuple[DetectorInputs, Tensor]:
        trainer = self._trainer
        if trainer is None:
            images, targets = (t.to(self.device) for t in batch)
            return self._inputs_from(self.forward_outputs(images), images)[0], targets
        batch = trainer.precision_plugin.convert_input(batch)
        batch = self._on_before_batch_transfer(batch, dataloader_idx=0)
        images, targets = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        with trainer.precision_plugin.forward_context():
            out = self.forward_outputs(images)
        with full_precision(images.device):
            return self._inputs_from(out, images)[0], targets
