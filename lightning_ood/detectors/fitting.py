"""The streaming fit pass of detectors over the ID training set, and its on-disk cache beside a checkpoint."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ood.contract import DetectorInputs
from lightning_ood.detectors.base import Detector

#: Turns one loader batch into what the detectors update on: ``(DetectorInputs, targets [B])``.
Describe = Callable[[Any], tuple[DetectorInputs, Tensor]]


def fit_detectors(
    detectors: Sequence[Detector],
    batches: Iterable,
    describe: Describe,
    *,
    progress: bool = True,
) -> None:
    """Fit ``detectors`` in ONE streaming pass over ``batches``.

    ``describe`` runs the method's forward pass on a batch (through the same batch pipeline, precision and
    float32 promotion as the test step). Runs with gradients off but outside inference mode, so the fitted
    buffers are ordinary tensors that can be saved and loaded later. Each detector's ``finalize`` sums its
    statistics across ranks under DDP.
    """
    for det in detectors:
        det.reset()
    total = len(batches) if hasattr(batches, "__len__") else None
    names = ", ".join(d.name for d in detectors)
    bar = tqdm(
        batches,
        total=total,
        desc=f"Fitting detectors ({names}) on ID train",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        # off a terminal (log files, SLURM) a line every 30 s rather than a flood of carriage returns
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    with torch.inference_mode(False), torch.no_grad():
        for batch in bar:
            inputs, targets = describe(batch)
            for det in detectors:
                det.update(inputs, targets)
        for det in detectors:
            det.finalize()


def cache_path(ckpt_path: str | os.PathLike) -> Path:
    """Where fitted detector statistics for a checkpoint are cached: beside it, ``<ckpt>.detectors.pt``."""
    return Path(f"{ckpt_path}.detectors.pt")


def read_cache(ckpt_path: str | os.PathLike, key: str, detectors: Sequence[Detector]) -> dict[str, Any]:
    """``{detector name: fitted state}`` cached beside ``ckpt_path`` for the fit fingerprint ``key`` (see
    :meth:`~lightning_ood.methods.OODMethod.fit_key`), for those of ``detectors`` whose class and
    hyperparameters (their ``fingerprint()``) are the same as when they were fitted. Memory-mapped, so only the
    matching entries are read."""
    entries = _read(cache_path(ckpt_path), key)
    return {
        d.name: entries[d.name]["state"]
        for d in detectors
        if d.name in entries and entries[d.name]["fingerprint"] == d.fingerprint()
    }


def _read(path: Path, key: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return cache.get("detectors", {}) if cache.get("key") == key else {}


def save_cache(detectors: Sequence[Detector], ckpt_path: str | os.PathLike, key: str) -> Path:
    """Write the fitted state of ``detectors`` (merged with entries cached under the same key) atomically."""
    path = cache_path(ckpt_path)
    entries = {name: _materialised(entry) for name, entry in _read(path, key).items()}
    for det in detectors:
        state = {k: v.detach().cpu() for k, v in det.state_dict().items()}
        entries[det.name] = {"fingerprint": det.fingerprint(), "state": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "detectors": entries}, tmp)
    os.replace(tmp, path)
    return path


def _materialised(entry: dict[str, Any]) -> dict[str, Any]:
    """A cached entry read into memory (its tensors were memory-mapped from the file about to be replaced)."""
    return {"fingerprint": entry["fingerprint"], "state": {k: v.clone() for k, v in entry["state"].items()}}
