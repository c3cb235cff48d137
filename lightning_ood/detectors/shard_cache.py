"""The fit cache of sharded banks (KNN, NNGuide under DDP): each rank writes and reads its own share.

A sharded fit has no whole state on any rank, so the ordinary fit cache (``<ckpt>.detectors.pt``, written by
rank 0, read by rank 0 and broadcast) cannot hold it, and loading a one-process bank from it would send the
whole ``N x D`` bank to every rank. Instead each rank ``r`` of ``W`` writes its share to
``<ckpt>.detectors.rank<r>-of-<W>.pt`` and, in a later run on the same number of ranks with the same fit key
(weights, data, settings) and hyperparameters, reads it back (memory-mapped): per-rank I/O and memory are the
share's, ``N / W`` rows. The ranks agree (one all-reduce) that every one of them found its share before any
uses it; if one did not (another world size, a node that does not see the file, a missing or stale file),
every rank fits again. The files live beside the checkpoint, so on several nodes they need the shared file
system the multi-node config already requires.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_ood.detectors.sharded_bank import ShardedBank
from lightning_ood.distributed import all_reduce_max, distributed_world


def shard_cache_path(ckpt_path: str | os.PathLike, rank: int, world: int) -> Path:
    """``<ckpt>.detectors.rank<rank>-of-<world>.pt``: rank ``rank``'s shares of the sharded fits."""
    return Path(f"{ckpt_path}.detectors.rank{rank}-of-{world}.pt")


def shards_under_ddp(det: object) -> bool:
    """Whether ``det`` keeps a sharded bank in this (multi-process) run, so it is cached share by share."""
    _, world = distributed_world()
    return world > 1 and isinstance(det, ShardedBank) and det.shards_under_ddp()


def save_shards(detectors: Sequence[ShardedBank], ckpt_path: str | os.PathLike, key: str) -> Path:
    """Every rank (call it on each): write this rank's shares of ``detectors`` (merged with the entries of the
    same ``key`` already there) atomically: a temporary file, then a rename, so a crash leaves no partial file
    that looks complete."""
    rank, world = distributed_world()
    path = shard_cache_path(ckpt_path, rank, world)
    entries = {name: _materialised(entry) for name, entry in _read(path, key).items()}
    for det in detectors:
        state = {k: v.detach().cpu() for k, v in det.share_state().items()}
        entries[det.name] = {"fingerprint": det.fingerprint(), "state": state}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"key": key, "world": world, "rank": rank, "detectors": entries}, tmp)
    os.replace(tmp, path)
    return path


def load_shards(detectors: Sequence[ShardedBank], ckpt_path: str | os.PathLike | None, key: str) -> list[str]:
    """Every rank (a collective): load each of ``detectors`` whose share every rank finds cached for ``key``;
    returns their names (the same on every rank). The others are left as they were (unfitted)."""
    if not detectors:
        return []
    rank, world = distributed_world()
    entries = _read(shard_cache_path(ckpt_path, rank, world), key) if ckpt_path else {}
    found = [d.name in entries and entries[d.name]["fingerprint"] == d.fingerprint() for d in detectors]
    device = detectors[0].rows.device
    missing = all_reduce_max(torch.tensor([int(not f) for f in found], dtype=torch.long, device=device))
    loaded = []
    for det, absent in zip(detectors, missing.tolist(), strict=True):
        if not absent:
            det.load_share(entries[det.name]["state"])
            loaded.append(det.name)
    return loaded


def _read(path: Path, key: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable file (another torch, a truncated copy) is a miss, never trusted
        return {}
    return cache.get("detectors", {}) if cache.get("key") == key else {}


def _materialised(entry: dict[str, Any]) -> dict[str, Any]:
    """A cached entry read into memory (its tensors were memory-mapped from the file about to be replaced)."""
    return {"fingerprint": entry["fingerprint"], "state": {k: v.clone() for k, v in entry["state"].items()}}
