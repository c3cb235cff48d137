"""The KNN detector's speed options: a seeded subset of the bank and faiss indexes (optional dependency).

Written on faiss rather than by hand: faiss (``faiss-cpu``) is the maintained library for exact and
approximate inner-product search; we only build its index from the bank and read the k-th similarity back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

#: ``KNN(index=...)`` values: the built-in exact search, or a faiss index.
INDEXES = ("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw")


def check_index(index: str, *, nlist: int, nprobe: int, hnsw_m: int, ef_search: int) -> None:
    """Raise a clear error for an unknown index or a non-positive setting (faiss itself is imported lazily)."""
    if index not in INDEXES:
        raise ValueError(f"KNN index must be one of {list(INDEXES)}, got {index!r}")
    for key, value in (("nlist", nlist), ("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
        if value < 1:
            raise ValueError(f"KNN {key} must be >= 1, got {value}")


def index_kwargs(knn: Any) -> dict[str, int]:
    """The settings of ``knn.index`` that apply to it."""
    if knn.index == "faiss_ivf":
        return {"nlist": knn.nlist, "nprobe": knn.nprobe}
    if knn.index == "faiss_hnsw":
        return {"hnsw_m": knn.hnsw_m, "ef_search": knn.ef_search}
    return {}


def index_settings(knn: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in index_kwargs(knn).items())


def subset_rows(n: int, fraction: float, seed: int) -> Tensor:
    """The sorted row indices of a seeded random subset of ``max(1, round(fraction * n))`` of ``n`` rows."""
    keep = max(1, round(fraction * n))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:keep].sort().values


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
        raise ImportError(
            "KNN index='faiss_*' needs faiss: pip install faiss-cpu (or the project's [faiss] extra), or use "
            "index='exact'"
        ) from error
    return faiss


class FaissSearch:
    """A faiss inner-product index over a bank of unit rows; :meth:`kth_largest` returns the k-th largest
    cosine per query. faiss searches on CPU in float32: the bank and queries are copied there."""

    def __init__(self, bank: Tensor, index: str, **settings: int) -> None:
        faiss = _faiss()
        data = np.ascontiguousarray(bank.detach().float().cpu().numpy())
        n, dim = data.shape
        if index == "faiss_flat":
            self.index = faiss.IndexFlatIP(dim)
        elif index == "faiss_ivf":
            nlist = min(settings["nlist"], n)
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(data)
            self.index.nprobe = min(settings["nprobe"], nlist)
        elif index == "faiss_hnsw":
            self.index = faiss.IndexHNSWFlat(dim, settings["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = settings["ef_search"]
        else:
            raise ValueError(f"not a faiss index: {index!r}")
        self.index.add(data)
        self.size = n

    def kth_largest(self, queries: Tensor, k: int) -> Tensor:
        """``[B]`` the k-th largest similarity found for each query, in the queries' dtype and device."""
        if k > self.size:
            raise ValueError(f"k={k} exceeds the bank size {self.size}")
        sims, ids = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        # An approximate index may return fewer than k neighbours (id -1, similarity -inf or -3.4e38): the
        # k-th similarity is then unknown; the lowest possible cosine, -1, is the conservative stand-in.
        kth = np.where(ids[:, k - 1] < 0, -1.0, sims[:, k - 1])
        return torch.from_numpy(kth.astype(np.float64)).to(device=queries.device, dtype=queries.dtype)
