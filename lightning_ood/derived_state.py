"""One mechanism for everything derived from (weights, data, settings): a fingerprint, and reuse only on a match.

Fitted detector statistics, attacked test sets, DiffGuard's ID-validation standardisation, HeatmapOOD's outlier
targets, detector-search results and the on-disk fit cache are all computed from a method's weights, some data
and some settings. Each carries the :func:`fingerprint` of what it was computed from, kept in a plain
``{artefact name: fingerprint}`` dict (:data:`Stamps`) by its owner. When an evaluation starts,
:func:`check_fresh` computes the current fingerprint and compares: equal, the artefact is reused (and the log
says so, once per start); different, it is recomputed and :func:`stamp` records the new fingerprint. So testing
checkpoint A then B, datamodule a then b, or fitting and testing again in one process gives the rows of a fresh
process.

Under DDP rank 0 alone computes the fingerprint and decides; the decision and the fingerprint are broadcast
(:func:`rank_zero_decides`), so every rank takes the same branch and reaches the same collectives even when
their files or memory disagree (a node-local cache, a lagging file system).

Weights are fingerprinted by content (:func:`module_fingerprint`: BLAKE2b over every parameter and buffer), so
any change is seen, whatever made it (``load_state_dict``, an optimiser step, an in-place edit). Cost: 0.6 s
for a ResNet-50's 25.6 M parameters (102 MB) on two loaded CPU cores (``benchmarks/fingerprint_cost.py``,
docs/benchmarks.md section 10), paid once per evaluation start, on rank 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

__all__ = ["Stamps", "check_fresh", "fingerprint", "module_fingerprint", "rank_zero_decides", "stamp"]

#: ``{artefact name: the fingerprint it was computed from}``, kept by the artefact's owner.
Stamps = dict[str, str]
T = TypeVar("T")


def fingerprint(**parts: Any) -> str:
    """A hex digest of ``parts`` (JSON with sorted keys; anything else as ``str``): the same parts, the same
    digest, in any process."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """BLAKE2b of named tensors' names, dtypes, shapes and bytes (in the given order)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            digest.update(flat.contiguous().view(torch.uint8).cpu().numpy().data)
    return digest.hexdigest()


def module_fingerprint(module: nn.Module, skip: Collection[str] = ()) -> str:
    """Content hash of every parameter and buffer (persistent or not) of ``module``, leaving out the children
    whose top-level attribute names are in ``skip``."""
    prefixes = tuple(f"{name}." for name in skip)
    named = [*module.named_parameters(), *module.named_buffers()]
    return tensors_digest((n, t) for n, t in named if not n.startswith(prefixes))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_zero_decides(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 only, its (picklable) result broadcast to every rank; every rank must call
    this at the same point. An exception raised by ``decide()`` is raised on every rank (none is left waiting).
    Outside a distributed run: ``decide()``."""
    if not _distributed():
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, decide())]
        except Exception as error:  # every rank raises it, instead of the others waiting in the broadcast
            box = [(False, error)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def check_fresh(stamps: Stamps, name: str, current: Callable[[], str], what: str = "") -> tuple[bool, str]:
    """``(fresh, fingerprint)``: whether the artefact ``name`` was computed from the ``current()`` fingerprint.

    Rank 0 computes ``current()`` and compares it with its stamp; both are broadcast. ``what`` (e.g. "fit of
    ['knn']"): logged on reuse as "Using the <what> (same weights, data and settings)".
    """
    fresh, value = rank_zero_decides(lambda: _compare(stamps, name, current))
    if fresh and what:
        rank_zero_info(f"Using the {what} (same weights, data and settings)")
    return fresh, value


def _compare(stamps: Stamps, name: str, current: Callable[[], str]) -> tuple[bool, str]:
    value = current()
    return stamps.get(name) == value, value


def stamp(stamps: Stamps, name: str, value: str | None) -> None:
    """Record that ``name`` was computed from ``value`` (``None``: forget it, it is stale)."""
    if value is None:
        stamps.pop(name, None)
    else:
        stamps[name] = value
