"""Shared helpers of the data tests: fake Fashion-MNIST files and a tiny digits DataModule."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from lightning_ood.data import (
    IDSetSpec,
    OODDataModule,
    OODSetSpec,
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> None:
    """Fake Fashion-MNIST: image i is the constant i (so images identify themselves), label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)


def tiny(**kwargs: object) -> OODDataModule:
    """A digits DataModule small enough for unit tests."""
    defaults: dict = dict(
        id_set=IDSetSpec("digits"),
        ood_sets=[
            OODSetSpec("faces", "faces", "near", limit=30),
            OODSetSpec("noise", "gaussian", "far", options={"n": 23, "size": 8, "channels": 1}),
        ],
        train_limit=60,
        val_limit=20,
        test_limit=25,
        batch_size=16,
    )
    return OODDataModule(**{**defaults, **kwargs})  # type: ignore[arg-type]


def all_batches(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(targets)
