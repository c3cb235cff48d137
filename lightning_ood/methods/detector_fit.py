"""The streaming fit pass of a method's detectors over the ID training set, and its on-disk cache."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightning_ood.detectors.base import Detector, DetectorInputs, ScoringModel


def fit_detectors(
    model: ScoringModel,
    detectors: Sequence[Detector],
    loader: Iterable,
    *,
    device: torch.device,
    progress: bool = True,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Fit ``detectors`` in ONE streaming pass of ``model`` over ``loader`` (``(images, targets)`` batches).

    Runs with gradients off but outside inference mode, so the fitted buffers are ordinary tensors that can be
    saved and loaded later. ``forward_context`` wraps each forward pass (the trainer's precision context, so
    training statistics come from the same precision as the test step's features). Each detector's
    ``finalize`` sums its statistics across ranks under DDP.
    """
    for det in detectors:
        det.reset()
    total = len(loader) if hasattr(loader, "__len__") else None
    names = ", ".join(d.name for d in detectors)
    bar = tqdm(
        loader,
        total=total,
        desc=f"Fitting detectors ({names}) on ID train",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        # off a terminal (log files, SLURM) a line every 30 s rather than a flood of carriage returns
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    with torch.inference_mode(False), torch.no_grad():
        for images, targets in bar:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with forward_context():
                out = model.forward_outputs(images)
            batch = DetectorInputs.from_outputs(out, head=model.head, inputs=images, model=model)
            for det in detectors:
                det.update(batch, targets)
        for det in detectors:
            det.finalize()


def cache_path(ckpt_path: str | os.PathLike) -> Path:
    """Where fitted detector statistics for a checkpoint are cached: beside it, ``<ckpt>.detectors.pt``."""
    return Path(f"{ckpt_path}.detectors.pt")


def _ckpt_stamp(ckpt_path: str | os.PathLike) -> tuple[int, int]:
    st = Path(ckpt_path).stat()
    return st.st_size, st.st_mtime_ns


def load_cached(detectors: Sequence[Detector], ckpt_path: str | os.PathLike) -> list[Detector]:
    """Load cached fitted state into the detectors it matches; return the detectors still to fit.

    A cached entry is used only when the checkpoint file is unchanged (size and mtime) and the detector's
    class and hyperparameters (its fingerprint) are the same as when it was fitted.
    """
    path = cache_path(ckpt_path)
    if not path.is_file():
        return list(detectors)
    cache = torch.load(path, map_location="cpu", weights_only=True)
    if tuple(cache.get("ckpt_stamp", ())) != _ckpt_stamp(ckpt_path):
        return list(detectors)
    remaining = []
    for det in detectors:
        entry = cache["detectors"].get(det.name)
        if entry is None or entry["fingerprint"] != det.fingerprint():
            remaining.append(det)
            continue
        det.load_state_dict(entry["state"])
    return remaining


def save_cache(detectors: Sequence[Detector], ckpt_path: str | os.PathLike) -> Path:
    """Write the fitted state of ``detectors`` (merged with what is cached already) atomically."""
    path = cache_path(ckpt_path)
    cache = {"ckpt_stamp": list(_ckpt_stamp(ckpt_path)), "detectors": {}}
    if path.is_file():
        old = torch.load(path, map_location="cpu", weights_only=True)
        if tuple(old.get("ckpt_stamp", ())) == _ckpt_stamp(ckpt_path):
            cache["detectors"].update(old["detectors"])
    for det in detectors:
        state = {k: v.detach().cpu() for k, v in det.state_dict().items()}
        cache["detectors"][det.name] = {"fingerprint": det.fingerprint(), "state": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(cache, tmp)
    os.replace(tmp, path)
    return path
