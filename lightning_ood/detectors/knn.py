"""Deep nearest-neighbour detector: negative cosine similarity to the k-th nearest ID training feature."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs
from lightning_ood.detectors.gather import gather_rows
from lightning_ood.detectors.knn_index import (
    FaissSearch,
    check_index,
    index_kwargs,
    index_settings,
    subset_rows,
)
from lightning_ood.precision import at_least_float32_dtype

_BANK_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class KNN(Detector):
    """Exact k-nearest-neighbour score on L2-normalised features (Sun et al., ICML 2022, "Out-of-distribution
    detection with deep nearest neighbors", eq. 3; the unsupervised k-NN of Adaloglou et al., TMLR 2024).

    With ``z* = z / ||z||`` and the bank ``{z*_i}`` of normalised ID-train features, the score of a test
    feature ``z`` is ``-cos_(k)(z, bank)``: minus the k-th largest cosine similarity, which is a monotone
    function of Sun et al.'s k-th nearest Euclidean distance ``||z* - z*_(k)|| = sqrt(2 - 2 cos_(k))``.
    Higher = more OOD; range ``[-1, 1]``. Ties are harmless: the k-th largest *value* is unique.

    Fitting keeps every normalised ID-train feature (the bank is not a sufficient statistic, so the float64
    accumulation of the other fits does not apply: features are stored in ``bank_dtype``, float32 by default as faiss
    does; until ``finalize`` they are kept as float32, or float64 for a float64 bank). ``finalize`` gathers
    the per-rank banks once (:func:`~lightning_ood.detectors.gather.gather_rows`; a rank that got no fit
    batch sends an empty ``[0, D]`` bank), so a DDP fit gives the same bank rows, in rank order, as a
    one-process fit. Memory: ``N * D * itemsize`` bytes for the bank buffer (e.g. CIFAR-10 with ResNet-18
    features: 50k x 512 x 4 B = 100 MB), on the features' device.

    Scoring is exact brute force, chunked over the bank with a running top-k merge: peak extra memory is
    ``B * (chunk_size + 2k)`` values (32 MB for B = 1024 at the default), never ``B x N`` nor ``B x B``.
    It runs on any device. Similarities are computed in the features' dtype, at least float32 (float64
    features are not downcast), so scores are float32, or float64 for float64 features.

    Args:
        k: which neighbour; 1 (the default) is the unsupervised k-NN of Adaloglou et al. Sun et al. use
            k = 50 for CIFAR-10 (full training set) and k = 1000 for ImageNet.
        chunk_size: bank rows per chunk when scoring.
        bank_dtype: storage dtype of the bank, ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``;
            half precision halves memory (similarities are still computed in float32 or better, chunk by
            chunk, but the rounded bank changes scores by up to ~1e-3); ``"float64"`` doubles it and keeps
            float64 features exact.
        bank_fraction: keep a seeded random subset of this fraction of the ID-train features as the bank
            (Sun et al. use 1 % of ImageNet). Scoring cost and memory shrink by the same factor; the scores
            change (docs/benchmarks.md measures by how much). ``1.0`` (default): the whole training set.
        seed: seed of the ``bank_fraction`` subset (the same on every rank: the subset is drawn after the
            gather, so DDP and one process keep the same rows).
        index: ``"exact"`` (default: the chunked brute-force search above), or a faiss index built from the
            bank at the first score (optional dependency ``faiss-cpu``; runs on CPU, float32):
            ``"faiss_flat"`` (exact inner product), ``"faiss_ivf"`` (inverted lists: ``nlist`` k-means cells,
            ``nprobe`` searched; approximate) or ``"faiss_hnsw"`` (graph with ``hnsw_m`` links and search
            depth ``ef_search``; approximate). An approximate index can miss true neighbours, so its k-th
            similarity is at most the exact one: a score is then higher (more OOD) than exact, never lower.
        nlist, nprobe, hnsw_m, ef_search: the faiss index settings (see ``index``).
        name: log key; defaults to ``"knn"``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features"})
    needs_fit: ClassVar[bool] = True

    bank: Tensor

    def __init__(
        self,
        k: int = 1,
        chunk_size: int = 8192,
        bank_dtype: str = "float32",
        bank_fraction: float = 1.0,
        seed: int = 0,
        index: str = "exact",
        nlist: int = 256,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        name: str | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"KNN k must be >= 1, got {k}")
        if chunk_size < 1:
            raise ValueError(f"KNN chunk_size must be >= 1, got {chunk_size}")
        if bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"KNN bank_dtype must be one of {sorted(_BANK_DTYPES)}, got {bank_dtype!r}")
        if not 0 < bank_fraction <= 1:
            raise ValueError(
                f"KNN bank_fraction must be in (0, 1], e.g. 0.1 for a 10 % bank, got {bank_fraction}"
            )
        check_index(index, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
        super().__init__(name)
        self.k = k
        self.chunk_size = chunk_size
        self.bank_dtype = bank_dtype
        self.bank_fraction = bank_fraction
        self.seed = seed
        self.index = index
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search = nlist, nprobe, hnsw_m, ef_search
        self.register_buffer("bank", torch.empty(0, dtype=_BANK_DTYPES[bank_dtype]))
        self._parts: list[Tensor] = []
        self._search: FaissSearch | None = None

    def extra_repr(self) -> str:
        text = f"k={self.k}, chunk_size={self.chunk_size}, bank_dtype={self.bank_dtype!r}"
        # Options only when set, so the default's fingerprint (and the fit caches keyed by it) stays the same.
        if self.bank_fraction != 1.0:
            text += f", bank_fraction={self.bank_fraction}, seed={self.seed}"
        if self.index != "exact":
            text += f", index={self.index!r}, " + index_settings(self)
        return text

    def reset(self) -> None:
        super().reset()
        self._parts = []
        self._search = None
        self.bank = self.bank.new_empty(0)  # free the old bank before a refit

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._search = None  # a new bank: the faiss index is rebuilt from it at the next score
        super()._load_from_state_dict(*args, **kwargs)

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        """Append the L2-normalised ``[B, D]`` features of one ID-train batch to this rank's bank."""
        part_dtype = at_least_float32_dtype(_BANK_DTYPES[self.bank_dtype])
        self._parts.append(normalize(batch.features).to(part_dtype))

    def finalize(self) -> None:
        """Concatenate this rank's features, gather every rank's (uneven sizes allowed) and store the bank.

        A collective: every rank must call it, also one that got no fit batch (it contributes no rows). Raises
        on every rank when no rank saw any feature.
        """
        local = torch.cat(self._parts) if self._parts else None
        self._parts = []
        bank = gather_rows(local, device=self.bank.device, who=self.name)
        if self.bank_fraction < 1:
            bank = bank[subset_rows(len(bank), self.bank_fraction, self.seed).to(bank.device)]
        self.bank = bank.to(_BANK_DTYPES[self.bank_dtype]).contiguous()
        self._search = None
        if self.bank.shape[0] < self.k:
            raise ValueError(f"KNN k={self.k} exceeds the bank size {self.bank.shape[0]}")
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` scores ``-cos_(k)`` for ``batch.features`` of shape ``[B, D]``; higher = more OOD."""
        queries = normalize(batch.features)
        if self.index == "exact":
            return -kth_largest_cosine(queries, self.bank, self.k, self.chunk_size)
        if self._search is None:
            self._search = FaissSearch(self.bank, self.index, **index_kwargs(self))
        return -self._search.kth_largest(queries, self.k)


def normalize(features: Tensor | None) -> Tensor:
    """``[B, D]`` rows scaled to unit L2 norm (computed in float64; zero rows stay zero), returned in the
    features' dtype promoted to at least float32 (float64 stays float64)."""
    if features is None:
        raise ValueError("KNN needs `features`")
    out_dtype = at_least_float32_dtype(features.dtype)
    return F.normalize(features.detach().double().flatten(1), dim=1).to(out_dtype)


def kth_largest_cosine(queries: Tensor, bank: Tensor, k: int, chunk_size: int) -> Tensor:
    """The k-th largest of ``queries @ bank.T`` per row, computed chunk by chunk over the bank.

    Args:
        queries: ``[B, D]`` float32 or float64 unit rows; the similarities are computed in their dtype.
        bank: ``[N, D]`` unit rows, any float dtype (cast to ``queries.dtype`` one chunk at a time).
        k: ``1 <= k <= N``.
        chunk_size: bank rows per chunk; peak extra memory is ``B * (chunk_size + 2k)`` values.

    Returns:
        ``[B]`` the k-th largest similarity of each query (exact, ties included).
    """
    if bank.shape[0] < k:
        raise ValueError(f"k={k} exceeds the bank size {bank.shape[0]}")
    bank = bank.to(queries.device)
    rows = min(chunk_size, bank.shape[0])
    if k == 1:
        return _largest_cosine(queries, bank, rows)
    # One reused [B, chunk] buffer: a fresh 10-100 MB allocation per chunk costs page faults on CPU.
    buf = queries.new_empty(queries.shape[0], rows)
    best: Tensor | None = None  # [B, <=k] the largest similarities seen so far
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start : start + chunk_size].to(queries.dtype)
        full = chunk.shape[0] == buf.shape[1]
        sims = torch.mm(queries, chunk.T, out=buf) if full else queries @ chunk.T  # [B, c]
        top = sims.topk(min(k, sims.shape[1]), dim=1, sorted=False).values
        if best is not None:  # merge two small [B, <=k] sets
            top = torch.cat([best, top], dim=1)
            top = top.topk(min(k, top.shape[1]), dim=1, sorted=False).values
        best = top
    assert best is not None
    return best.amin(dim=1)  # best holds exactly the k largest: its minimum is the k-th largest


def _largest_cosine(queries: Tensor, bank: Tensor, rows: int) -> Tensor:
    """k = 1: ``[B]`` the largest of ``queries @ bank.T`` per row. Products are bank-major (``[rows, B]``, reduced
    over the bank rows, one reused buffer): on CPU they ran faster than ``[B, rows]`` products reduced along a
    row (docs/benchmarks.md, section 8); the same values up to the float rounding of the product."""
    transposed = queries.T.contiguous()  # [D, B]
    buf = queries.new_empty(rows, queries.shape[0])
    best: Tensor | None = None
    for start in range(0, bank.shape[0], rows):
        chunk = bank[start : start + rows].to(queries.dtype)
        sims = torch.mm(chunk, transposed, out=buf) if chunk.shape[0] == rows else chunk @ transposed
        top = sims.amax(dim=0)  # amax is much cheaper than topk
        best = top if best is None else torch.maximum(best, top)
    assert best is not None
    return best


def nearest_euclidean(queries: Tensor, bank: Tensor, chunk_size: int = 8192) -> Tensor:
    """Row index of the Euclidean-nearest ``bank`` row of every query, exact, chunk by chunk over the bank.

    Distances ``||q||^2 - 2 q.b + ||b||^2`` are computed in float64 (so the argmin is that of the exact distances
    up to float64 rounding); ties go to the lowest index. Peak extra memory: ``B * chunk_size`` float64 values.

    Args:
        queries: ``[B, D]``.
        bank: ``[N, D]``, ``N >= 1``, any float dtype and device (moved one chunk at a time to the queries').
        chunk_size: bank rows per chunk.

    Returns:
        ``[B]`` long indices into ``bank``.
    """
    if bank.shape[0] == 0:
        raise ValueError("nearest_euclidean needs a non-empty bank")
    q = queries.detach().double()
    q_sq = q.square().sum(dim=1, keepdim=True)
    best = torch.full((len(q),), float("inf"), dtype=torch.float64, device=q.device)
    index = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start : start + chunk_size].to(q.device, torch.float64)
        dist = q_sq - 2 * q @ chunk.T + chunk.square().sum(dim=1)  # [B, c]
        value, where = dist.min(dim=1)
        closer = value < best  # strict: an equal distance in a later chunk keeps the lower index
        best = torch.where(closer, value, best)
        index = torch.where(closer, where + start, index)
    return index
