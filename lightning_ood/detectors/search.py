"""Leak-free hyperparameter search for detectors: ID validation images against auxiliary outliers only.

For each detector with a grid, every candidate (one combination of the grid's values) is a fresh detector
built with those values, **re-fitted** on the ID training set: all candidates of all detectors in ONE
streaming fit pass, then scored in ONE pass over the ID validation split and the auxiliary outlier set
(unaugmented). The candidate with the best validation metric (AUROC by default) replaces the detector; ties
keep the earlier candidate in grid order. Test sets are never read.

Why this exists: OpenOOD's automatic parameter search scored its ViM candidates without re-fitting them (so
every candidate scored the same) and picked Mahalanobis settings from noise. Here each candidate is built and
fitted from scratch, and a candidate that changes nothing scores exactly like the original (tested).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ood.derived_state import rank_zero_decides
from lightning_ood.detectors.base import Detector, begin_scoring
from lightning_ood.detectors.fitting import Describe, fit_detectors
from lightning_ood.detectors.shared_fit import share_fit_state
from lightning_ood.distributed import all_gather_cat, distributed_world
from lightning_ood.metrics import ood_metrics

__all__ = ["SEARCH_METRICS", "build_candidate", "expand_grid", "search_detectors"]

#: Selection metrics and whether higher is better.
SEARCH_METRICS = {"auroc": True, "fpr95_idpos": False, "fpr95_oodpos": False}


def _init_args(det: Detector) -> dict[str, Any]:
    """The detector's constructor arguments, read back from its same-named attributes."""
    params = inspect.signature(type(det).__init__).parameters
    return {name: getattr(det, name) for name in params if name != "self" and hasattr(det, name)}


def build_candidate(det: Detector, values: Mapping[str, Any]) -> Detector:
    """A new, unfitted detector of ``det``'s class and name with ``values`` replacing its hyperparameters."""
    args = _init_args(det)
    unknown = sorted(set(values) - set(args) - {"name"})
    if unknown:
        raise ValueError(
            f"detector_search: {det.name!r} ({type(det).__name__}) has no hyperparameter {unknown}; its "
            f"hyperparameters are {sorted(set(args) - {'name'})}"
        )
    return type(det)(**{**args, **values, "name": det.name})


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(
                f"detector_search: the values of {key!r} must be a non-empty list, got {values!r}"
            )
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _quiet() -> bool:
    """Progress bars on rank 0 only."""
    return distributed_world()[0] != 0


def _score_pass(
    candidates: Sequence[Detector], batches: Iterable, describe: Describe, desc: str
) -> list[Tensor]:
    """Every candidate's scores over ``batches`` from one forward pass per batch, gathered over ranks."""
    scores: list[list[Tensor]] = [[] for _ in candidates]
    total = len(batches) if hasattr(batches, "__len__") else None
    begin_scoring(candidates, total)  # a sharded KNN bank agrees on its collective rounds
    with torch.inference_mode(False), torch.no_grad():
        bar = tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=_quiet())
        for batch in bar:
            inputs, _ = describe(batch)
            for i, det in enumerate(candidates):
                scores[i].append(det(inputs).detach().to(torch.float64))
    empty = torch.empty(0, dtype=torch.float64)
    return [all_gather_cat(torch.cat(s) if s else empty).cpu() for s in scores]


def search_detectors(
    detectors: Mapping[str, Detector],
    grids: Mapping[str, Mapping[str, Sequence[Any]]],
    *,
    fit_batches: Iterable,
    val_batches: Iterable,
    outlier_batches: Iterable,
    describe: Describe,
    configure: Any = None,
    metric: str = "auroc",
) -> tuple[dict[str, Detector], dict[str, Any]]:
    """Choose each gridded detector's hyperparameters on ID validation vs auxiliary outliers.

    Args:
        detectors: the method's detectors by name; ``grids`` may name any subset.
        grids: ``{detector name: {hyperparameter: [values]}}``.
        fit_batches: ID training batches (not augmented) every candidate is fitted on.
        val_batches: ID validation batches (the ID side of the search).
        outlier_batches: auxiliary outlier batches, not augmented (the OOD side of the search).
        describe: the method's forward pass of one batch (``(DetectorInputs, targets)``).
        configure: passed to each candidate's ``configure`` (the datamodule).
        metric: ``auroc`` (maximised), ``fpr95_idpos`` or ``fpr95_oodpos`` (minimised).

    Returns:
        ``(chosen, record)``: the fitted winning detector per gridded name, and ``{metric, n_id, n_ood,
        detectors: {name: {chosen: {...}, grid: [{params, auroc, fpr95_idpos, fpr95_oodpos}, ...]}}}``.
    """
    if metric not in SEARCH_METRICS:
        raise ValueError(f"detector_search.metric must be one of {sorted(SEARCH_METRICS)}, got {metric!r}")
    unknown = sorted(set(grids) - set(detectors))
    if unknown:
        raise ValueError(
            f"detector_search.grid names {unknown}, which the model does not have; its detectors are "
            f"{sorted(detectors)} (grids are keyed by detector name)"
        )
    candidates: list[tuple[str, dict[str, Any], Detector]] = []
    # Outside inference mode (testing runs in it): the candidates' buffers must be ordinary, fittable tensors.
    with torch.inference_mode(False):
        for name, grid in grids.items():
            for values in expand_grid(grid):
                cand = build_candidate(detectors[name], values)
                cand.configure(configure)
                candidates.append((name, values, cand.to(next(detectors[name].buffers()).device)))
    dets = [c for _, _, c in candidates]
    # Candidates that differ only in a scoring hyperparameter (KNN's k, ReAct's percentile) share one fit state.
    fit_detectors(
        share_fit_state([d for d in dets if d.needs_fit]), fit_batches, describe, progress=not _quiet()
    )
    val = _score_pass(dets, val_batches, describe, "Detector search: ID validation")
    aux = _score_pass(dets, outlier_batches, describe, "Detector search: auxiliary outliers")
    if not len(val[0]) or not len(aux[0]):
        raise ValueError(
            f"detector search needs ID validation images and auxiliary outliers; got {len(val[0])} and "
            f"{len(aux[0])} (set data.init_args.val_fraction > 0 and data.init_args.aux_set)"
        )
    # Rank 0 computes the metrics and the choice; every rank installs the same candidates.
    record = rank_zero_decides(lambda: _choose(candidates, val, aux, metric))
    chosen: dict[str, Detector] = {}
    for name, values, det in candidates:
        if values == record["detectors"][name]["chosen"]:
            chosen.setdefault(name, det)
    return chosen, record


def _choose(
    candidates: Sequence[tuple[str, dict[str, Any], Detector]],
    val: list[Tensor],
    aux: list[Tensor],
    metric: str,
) -> dict[str, Any]:
    """The search record: every candidate's validation metrics and the chosen values per detector."""
    record: dict[str, Any] = {"metric": metric, "n_id": len(val[0]), "n_ood": len(aux[0]), "detectors": {}}
    best: dict[str, float] = {}
    higher = SEARCH_METRICS[metric]
    labels = torch.cat([torch.zeros(len(val[0])), torch.ones(len(aux[0]))])
    for (name, values, _), s_val, s_aux in zip(candidates, val, aux, strict=True):
        metrics = ood_metrics(torch.cat([s_val, s_aux]), labels, set_name=f"id/val vs aux, {name} {values}")
        entry = {"params": values, **{k: metrics[k] for k in SEARCH_METRICS}}
        record["detectors"].setdefault(name, {"grid": []})["grid"].append(entry)
        value = metrics[metric]
        if name not in best or (value > best[name] if higher else value < best[name]):
            best[name] = value
            record["detectors"][name]["chosen"] = values
    return record
