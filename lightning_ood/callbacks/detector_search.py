"""``DetectorSearch``: choose detector hyperparameters on ID validation vs auxiliary outliers before testing."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.callbacks.results import atomic_write
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.derived_state import Stamps, fingerprint, rank_zero_decides, stamp
from lightning_ood.detectors.search import SEARCH_METRICS, search_detectors


class DetectorSearch(Callback):
    """Leak-free hyperparameter search for the method's detectors (``lightning_ood.detectors.search``).

    When testing starts, every candidate of every grid is fitted on ID train (one pass) and scored on the ID
    validation split against the auxiliary outlier set, unaugmented (one pass each); the best candidate by
    ``metric`` replaces the detector, under the same name. Test sets are never read. The choice and the whole
    grid go into ``detector_search.json`` in the run directory, into ``ood_results.json`` (``run ->
    detector_search``) and, under W&B, into a ``test/detector_search`` table and the run config.

    The choice carries the fingerprint of what it was made from (the method's weights, the fit data, the ID
    validation split, the outliers, the grid and the metric): testing again with all of them unchanged reuses
    it, anything else searches again. Under DDP every rank takes part in the passes, rank 0 computes the metrics
    and the choice, and every rank installs the same candidates. A method that trains with outliers is searched
    on its ID validation split (``val_dataloader()[0]``) against its held-out outliers.

    Args:
        grid: ``{detector name: {hyperparameter: [values]}}``, e.g. ``{knn: {k: [1, 10, 50]}, react:
            {percentile: [85, 90, 95]}}``; ``None`` (default): no search. ``configs/detector_search/default.yaml``
            holds grids for the usual detectors.
        metric: ``auroc`` (maximised, default), ``fpr95_idpos`` or ``fpr95_oodpos`` (minimised).
    """

    def __init__(self, grid: dict[str, dict[str, list[Any]]] | None = None, metric: str = "auroc") -> None:
        if metric not in SEARCH_METRICS:
            raise ValueError(
                f"detector_search.metric must be one of {sorted(SEARCH_METRICS)}, got {metric!r}"
            )
        self.grid = grid or {}
        self.metric = metric
        self.record: dict[str, Any] | None = None
        self._stamps: Stamps = {}  # what the record was computed from (lightning_ood.derived_state)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.grid:
            self.record = None
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "aux_eval_dataloader"):
            raise RuntimeError(
                "detector_search needs lightning_ood's OODDataModule (ID val and aux outliers)"
            )
        # Rank 0 fingerprints (weights, data, settings); the search reruns only when they changed.
        key, current = rank_zero_decides(lambda: self._fingerprints(pl_module, dm))
        if self.record is not None and self._stamps.get("search") == current:
            rank_zero_info(
                "Using the detector search's choice (same weights, data and settings): "
                + summary(self.record)
            )
        else:
            self._search(pl_module, dm, key)
            stamp(self._stamps, "search", current)
        self._write(trainer)

    def _fingerprints(self, pl_module: LightningModule, dm: Any) -> tuple[str, str]:
        """``(fit key, search fingerprint)``: the search also depends on the grid, the metric, the ID validation
        split and the auxiliary outliers."""
        key = pl_module.fit_key()
        data = {
            "aux_set": repr(dm.aux_set),
            "aux_val_fraction": dm.aux_val_fraction,
            "val_limit": dm.limits["val"],
        }
        return key, fingerprint(fit=key, grid=self.grid, metric=self.metric, data=data)

    def _search(self, pl_module: LightningModule, dm: Any, key: str) -> None:
        rank_zero_info(f"Detector search on ID val vs aux outliers: {json.dumps(self.grid)}")
        val = dm.val_dataloader()
        if isinstance(
            val, list
        ):  # [id_val, aux_val] for a method that trains with outliers, or [] (no split)
            val = val[0] if val else []
        was_training = pl_module.training
        pl_module.eval()
        chosen, self.record = search_detectors(
            dict(pl_module.detectors),
            self.grid,
            fit_batches=dm.fit_dataloader(),
            val_batches=val,
            outlier_batches=dm.aux_eval_dataloader(),
            describe=pl_module._describe,
            configure=dm,
            metric=self.metric,
        )
        pl_module.train(was_training)
        pl_module.adopt_fitted(chosen, key)  # fitted on the fit images with these weights: not fitted again
        rank_zero_info("Detector search chose " + summary(self.record))

    def _write(self, trainer: Trainer) -> None:
        directory = run_dir(trainer)  # a collective: every rank calls it
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(directory) / "detector_search.json", json.dumps(self.record, indent=2) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key="test/detector_search", columns=TABLE_COLUMNS, data=table_rows(self.record)
                )
                logger.experiment.config.update(
                    {f"detector_search/{k}": v for k, v in chosen_values(self.record).items()},
                    allow_val_change=True,
                )


TABLE_COLUMNS = ["detector", "params", "chosen", *SEARCH_METRICS]


def table_rows(record: Mapping[str, Any]) -> list[list[Any]]:
    """One row per candidate: detector, its values (JSON), whether it was chosen, its validation metrics."""
    rows = []
    for name, entry in record["detectors"].items():
        for cand in entry["grid"]:
            chosen = cand["params"] == entry["chosen"]
            rows.append([name, json.dumps(cand["params"]), chosen, *(cand[k] for k in SEARCH_METRICS)])
    return rows


def chosen_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"knn.k": 10, ...}``: the chosen value of every searched hyperparameter."""
    return {f"{n}.{k}": v for n, e in record["detectors"].items() for k, v in e["chosen"].items()}


def summary(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in chosen_values(record).items()) + (
        f" (by {record['metric']} on {record['n_id']} ID val vs {record['n_ood']} aux images)"
    )


def search_record(callbacks: Sequence[Callback]) -> dict[str, Any] | None:
    """The record of the trainer's ``DetectorSearch``, if one ran."""
    return next((cb.record for cb in callbacks if isinstance(cb, DetectorSearch) and cb.record), None)
