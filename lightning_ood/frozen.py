"""Heavy frozen sub-models (a classifier from its own checkpoint, a diffusion model) referenced by path and hash.

A method registers such a sub-model with :meth:`~lightning_ood.methods.OODMethod.register_frozen`: its
parameters are not trained (not in the optimiser), it stays in eval mode when the method trains, Lightning
moves it to the device with the method, and it is left out of the method's checkpoints, which record its path
and content hash instead. Loading the method's checkpoint later checks that the file still has that content.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn


@lru_cache(maxsize=64)
def _sha256(path: str, stamp: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (hex).

    Computed once per version of the file in this process: a rewrite changes the file's ctime (which, unlike
    its mtime, cannot be set back), so a new content is always hashed anew.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} does not exist or is not a file")
    st = p.stat()
    return _sha256(str(p.resolve()), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode for every parameter and layer of ``module``; returns it."""
    module.requires_grad_(False)
    return module.eval()


def load_method(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a lightning-ood method (e.g. a trained ``Classifier``) from its checkpoint, frozen.

    The class comes from the checkpoint (LightningCLI stores it as ``_class_path`` in the hyperparameters, and
    :class:`~lightning_ood.methods.OODMethod` stores ``lightning_ood_class``), so any method's checkpoint works.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(p)!r} does not exist; point the config at a trained method's .ckpt"
        )
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    class_path = ckpt.get("lightning_ood_class") or ckpt.get("hyper_parameters", {}).get("_class_path")
    if not class_path:
        raise ValueError(f"{str(p)!r} is not a lightning-ood method checkpoint (it names no method class)")
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    model = cls.load_from_checkpoint(p, map_location=map_location)
    # Loaded while LightningCLI instantiates another method (HeatmapOOD's classifier, DiffGuard's classifier and
    # diffusion model), the nested save_hyperparameters() takes the *outer* method's arguments from the CLI's
    # context: put the loaded method's own hyperparameters back.
    saved = ckpt.get("hyper_parameters")
    if saved:
        model.hparams.clear()
        model.hparams.update(saved)
    return freeze(model)


def save_method(module: nn.Module, path: str | os.PathLike) -> str:
    """Write a method built in code (random or hand-set weights, not trained by a ``Trainer``) as a checkpoint
    that :func:`load_method` and the methods' checkpoint arguments (e.g. ``DiffGuard.classifier``) read;
    returns the path.

    The ``optimizer`` and ``scheduler`` hyperparameters are left out of the file (classes and callables, which
    a weights-only load refuses); the loaded method takes its defaults for them. ``module`` is not changed.
    """
    from lightning.pytorch import Trainer

    removed = {key: module.hparams.pop(key) for key in ("optimizer", "scheduler") if key in module.hparams}
    try:
        trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.strategy.connect(module)
        trainer.save_checkpoint(path)
    finally:
        module.hparams.update(removed)
    return str(path)


def _unsaved_prefixes(module: nn.Module, prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{name}." for name in module._unsaved)


def drop_unsaved_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` post-hook: the children named in ``module._unsaved`` (detectors, frozen sub-models) are not
    training state and are left out."""
    prefixes = _unsaved_prefixes(module, prefix)
    for key in [k for k in state_dict if k.startswith(prefixes)]:
        del state_dict[key]


def keep_unsaved_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: detectors and frozen sub-models keep their own state.

    Entries for them in older checkpoints are ignored, and their current state stands in for the missing ones
    (so a strict load does not fail on them).
    """
    for name in module._unsaved:
        child_prefix = f"{prefix}{name}."
        for key in [k for k in state_dict if k.startswith(child_prefix)]:
            del state_dict[key]
        for key, value in getattr(module, name).state_dict(keep_vars=True).items():
            state_dict[child_prefix + key] = value
