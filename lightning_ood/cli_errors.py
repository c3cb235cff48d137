"""One-line errors of the CLI: a bad option or class (with the nearest valid names), and a checkpoint that does
not fit the configured model (with the differing hyperparameters), found before any weights are loaded."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_ood.run_info import SEED_KEY

_CLASS_PATH = re.compile(r"class_path '([\w.]+)'")
_NO_ATTR = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_NOT_ACCEPTED = re.compile(r"Option '(\w+)' is not accepted|No action for key \"?([\w.]+)\"?")
_UNRECOGNIZED = re.compile(r"Unrecognized arguments: (.*)", re.IGNORECASE)
_KEY = re.compile(r'^Parser key "([\w.]+)"')
#: Hyperparameters that do not shape a checkpoint's weights (a difference is not a mismatch).
_NOT_STRUCTURAL = frozenset({"detectors", "detector_cache", "optimizer", "scheduler", "scheduler_interval"})
#: LightningCLI's top-level optimiser options, and where the setting lives instead: given, they would silently
#: replace the model's configured optimiser and schedule. Only ``null`` is accepted (configs saved by 0.1).
MOVED_OPTIONS = {
    "optimizer": "model.init_args.optimizer",
    "lr_scheduler": "model.init_args.scheduler",
}


def moved_option_error(name: str) -> str:
    """Why the top-level ``name`` (``optimizer`` / ``lr_scheduler``) is refused, and what to set instead."""
    return (
        f"--{name} is not an option: the optimiser and its schedule are the model's settings, set "
        f"--{MOVED_OPTIONS[name]} (a top-level --{name} would silently replace the configured optimiser and "
        "schedule)"
    )


def _nearest(word: str, candidates: Iterable[str], n: int = 3, listed: int = 0) -> str:
    """``"; did you mean a or b?"`` (or, with ``listed``, up to that many valid names when none is close)."""
    valid = sorted(set(candidates))
    close = difflib.get_close_matches(word, valid, n=n, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    if listed and valid:
        return f"; valid: {', '.join(valid[:listed])}{', ...' if len(valid) > listed else ''}"
    return ""


def _class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _init_args(cls: Any) -> list[str]:
    names = []
    for klass in getattr(cls, "__mro__", (cls,)):
        if "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters.values()
            names += [
                p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
    return names


def _public_classes(module: str) -> list[str]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    return [name for name, value in vars(mod).items() if inspect.isclass(value) and not name.startswith("_")]


def explain_parse_error(message: str, parser: Any = None) -> str:
    """The jsonargparse error ``message`` as one line: the bad key, option or class and the nearest valid
    names (falls back to the message's own reasons)."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines()]
    key, class_path, out = "", "", []
    for line in lines:
        if m := _KEY.match(line):
            key = key or m.group(1)
        if m := _CLASS_PATH.search(line):
            class_path = m.group(1)
        if m := _NO_ATTR.search(line):
            module, name = m.groups()
            out.append(
                f"{key + ': ' if key else ''}no class {module}.{name}"
                f"{_nearest(name, _public_classes(module)).replace('mean ', f'mean {module}.')}"
            )
        elif (m := _NOT_ACCEPTED.search(line)) and class_path:
            option = m.group(1) or m.group(2)
            cls = _class(class_path)
            valid = _init_args(cls) if cls is not None else []
            out.append(f"{class_path} has no option {option!r}{_nearest(option, valid, listed=12)}")
        elif m := _UNRECOGNIZED.search(line):
            out += [_unknown_option(tok, parser) for tok in m.group(1).split() if tok.startswith("--")]
    if out:
        return "; ".join(dict.fromkeys(out))
    reasons = [
        x for x in lines if x and not x.startswith(("Does not validate", "Subtypes:", "Errors:", "Given"))
    ]
    return "; ".join(dict.fromkeys(reasons)) or message


def _unknown_option(token: str, parser: Any) -> str:
    option = token.partition("=")[0]
    name = option.lstrip("-")
    if name in MOVED_OPTIONS:
        return moved_option_error(name)
    known = [s for action in getattr(parser, "_actions", []) for s in action.option_strings]
    return f"unknown option {option}{_nearest(option, known)}"


def _differences(saved: Mapping[str, Any], configured: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(configured)) - _NOT_STRUCTURAL)
    return [
        f"{k}: checkpoint {saved.get(k)!r}, config {configured.get(k)!r}"
        for k in keys
        if repr(saved.get(k)) != repr(configured.get(k))
    ]


def check_checkpoint(model: LightningModule, ckpt_path: str) -> int | None:
    """Fail in one line when the checkpoint's weights cannot load into ``model``; return its training seed.

    The checkpoint is memory-mapped, so only its header is read here. Its tensors' names and shapes are
    compared with the model's; on a mismatch the error names the hyperparameters that differ between the
    checkpoint (``hyper_parameters``) and the config, else the first mismatched tensors.
    """
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be memory-mapped
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", {})
    mine = model.state_dict()
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in mine.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in mine if k not in state] if getattr(model, "strict_loading", True) else []
    if shapes or missing:
        diffs = _differences(ckpt.get("hyper_parameters", {}), dict(model.hparams))
        detail = "; ".join(diffs) if diffs else "; ".join(shapes[:3] or [f"missing weights {missing[:3]}"])
        raise ValueError(
            f"--ckpt_path {ckpt_path} was saved by a model other than the configured "
            f"{type(model).__name__} ({detail}): use the config the checkpoint was trained with (its run's "
            "config.yaml) or change these settings to the checkpoint's"
        )
    seed = ckpt.get(SEED_KEY)
    return int(seed) if seed is not None else None
