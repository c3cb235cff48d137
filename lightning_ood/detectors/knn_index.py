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


def _to_gpu(faiss: Any, index: Any, device: torch.device) -> tuple[Any, Any]:
    """``(index, resources)``: the index moved to ``device``'s GPU when faiss was built with GPU support and the
    index kind has a GPU implementation (flat and IVF; HNSW has none), else unchanged with no resources."""
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index, None
    if not isinstance(index, faiss.IndexFlat | faiss.IndexIVFFlat):
        return index, None
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, device.index or 0, index), resources


class FaissSearch:
    """A faiss inner-product index over a bank of unit rows; :meth:`kth_largest` returns the k-th largest
    cosine per query. faiss searches in float32: the bank and queries are copied to it. The index is built on
    the CPU and, when the bank is on a GPU and faiss has GPU support (``faiss-gpu``), moved to that GPU (flat
    and IVF indexes). :meth:`serialized` / ``FaissSearch.load`` store the built CPU index as bytes, so a fit
    cache can keep it instead of rebuilding it (k-means for IVF, the graph for HNSW) at every run.
    """

    def __init__(self, bank: Tensor, index: str, **settings: int) -> None:
        faiss = _faiss()
        data = np.ascontiguousarray(bank.detach().float().cpu().numpy())
        n, dim = data.shape
        if index == "faiss_flat":
            cpu = faiss.IndexFlatIP(dim)
        elif index == "faiss_ivf":
            nlist = min(settings["nlist"], n)
            cpu = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            cpu.train(data)
            cpu.nprobe = min(settings["nprobe"], nlist)
        elif index == "faiss_hnsw":
            cpu = faiss.IndexHNSWFlat(dim, settings["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            cpu.hnsw.efSearch = settings["ef_search"]
        else:
            raise ValueError(f"not a faiss index: {index!r}")
        cpu.add(data)
        self._adopt(cpu, bank.device)

    def _adopt(self, cpu: Any, device: torch.device) -> None:
        self.cpu_index = cpu
        self.index, self._resources = _to_gpu(_faiss(), cpu, device)
        self.size = int(cpu.ntotal)

    @classmethod
    def load(cls, data: Tensor, device: torch.device) -> FaissSearch:
        """The index stored by :meth:`serialized` (``data``: uint8 ``[bytes]``), on ``device`` as at build."""
        faiss = _faiss()
        search = cls.__new__(cls)
        search._adopt(faiss.deserialize_index(np.ascontiguousarray(data.cpu().numpy())), device)
        return search

    def serialized(self) -> Tensor:
        """The built CPU index as uint8 ``[bytes]`` (``faiss.serialize_index``)."""
        return torch.from_numpy(np.array(_faiss().serialize_index(self.cpu_index), dtype=np.uint8))

    def topk(self, queries: Tensor, k: int) -> Tensor:
        """``[B, k]`` the ``k`` largest similarities found for each query (``-inf`` where the index returned
        fewer than ``k``: a shard smaller than ``k``, or an approximate index), float64 on the queries' device."""
        if self.size == 0:
            return torch.full((len(queries), k), float("-inf"), dtype=torch.float64, device=queries.device)
        sims, ids = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        sims = np.where(ids < 0, -np.inf, sims.astype(np.float64))
        return torch.from_numpy(sims).to(queries.device)

    def kth_largest(self, queries: Tensor, k: int) -> Tensor:
        """``[B]`` the k-th largest similarity found for each query, in the queries' dtype and device."""
        if k > self.size:
            raise ValueError(f"k={k} exceeds the bank size {self.size}")
        return unknown_as_lowest(self.topk(queries, k)[:, k - 1]).to(queries.dtype)


def unknown_as_lowest(kth: Tensor) -> Tensor:
    """An approximate index may return fewer than k neighbours: the k-th similarity is then unknown (``-inf``);
    the lowest possible cosine, -1, is the conservative stand-in (the score is then the highest, most OOD)."""
    return torch.where(torch.isneginf(kth), torch.full_like(kth, -1.0), kth)
