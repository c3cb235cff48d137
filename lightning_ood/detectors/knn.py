"""Deep nearest-neighbour detector: negative cosine similarity to the k-th nearest ID training feature."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs, all_gather_cat, all_reduce_sum
from lightning_ood.detectors.knn_index import (
    FaissSearch,
    check_index,
    index_kwargs,
    index_settings,
    subset_rows,
    unknown_as_lowest,
)
from lightning_ood.detectors.knn_search import (  # re-exported: the exact searches live there
    kth_largest_cosine,
    nearest_euclidean,
    topk_cosines,
)
from lightning_ood.detectors.knn_shards import pad_topk
from lightning_ood.detectors.sharded_bank import ShardedBank
from lightning_ood.distributed import distributed_world
from lightning_ood.precision import at_least_float32_dtype

_BANK_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
PLACEMENTS = ("sharded", "replicated")
__all__ = ["KNN", "PLACEMENTS", "kth_largest_cosine", "nearest_euclidean", "normalize", "topk_cosines"]


class KNN(ShardedBank):
    """Exact k-nearest-neighbour score on L2-normalised features (Sun et al., ICML 2022, "Out-of-distribution
    detection with deep nearest neighbors", eq. 3; the unsupervised k-NN of Adaloglou et al., TMLR 2024).

    With ``z* = z / ||z||`` and the bank ``{z*_i}`` of normalised ID-train features, the score of a test
    feature ``z`` is ``-cos_(k)(z, bank)``: minus the k-th largest cosine similarity, which is a monotone
    function of Sun et al.'s k-th nearest Euclidean distance ``||z* - z*_(k)|| = sqrt(2 - 2 cos_(k))``.
    Higher = more OOD; range ``[-1, 1]``. Ties are harmless: the k-th largest *value* is unique.

    Fitting keeps every normalised ID-train feature (the bank is not a sufficient statistic, so the float64
    accumulation of the other fits does not apply: features are stored in ``bank_dtype``, float32 by default as
    faiss does; until ``finalize`` they are kept as float32, or float64 for a float64 bank). Memory:
    ``N * D * itemsize`` bytes for the bank (e.g. CIFAR-10 with ResNet-18 features: 50k x 512 x 4 B = 100 MB;
    ImageNet-1K with ResNet-50: 1.28M x 2048 x 4 B = 10.5 GB), on the features' device.

    Under DDP, ``bank_placement="sharded"`` (default) keeps on each rank the rows of its own fit batches,
    ``N / W`` of them (1.3 GB per GPU for ImageNet-1K on 8 GPUs), and merges a query's top-k across ranks with
    one collective round per scored batch (:mod:`~lightning_ood.detectors.knn_shards`; :meth:`begin_scoring`
    agrees on the number of rounds, so ranks with fewer or no test batches never hang), so the bank is never
    gathered; the scores are the one-process scores (exact search over the same rows: the top-k of a union is
    the top-k of the shards' top-k). A share is never a buffer (Lightning broadcasts buffers from rank 0 when a
    stage starts; :mod:`~lightning_ood.detectors.sharded_bank`). ``bank_placement="replicated"`` gathers the
    (subsampled) bank to every rank once and scores without collectives (``N x D`` per rank: for small banks
    only). ``bank_fraction`` subsamples before any communication. A sharded fit is cached share by share, each
    rank its own file (:mod:`~lightning_ood.detectors.shard_cache`); a one-process fit, with its built IVF / HNSW
    index, goes to the ordinary fit cache and loads (e.g. with ``load_state_dict``) under DDP by each rank
    keeping every ``W``-th row.

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
        seed: seed of the ``bank_fraction`` subset. The subset is drawn over the dataset indices of the fit
            rows (the fit loader's rank interleaving undone), each rank keeping its rows of it before any
            communication, so DDP and one process keep the same images.
        index: ``"exact"`` (default: the chunked brute-force search above), or a faiss index built from the
            bank when fitting (optional dependency ``faiss-cpu``, or ``faiss-gpu``: on a GPU the flat and IVF
            indexes search there; float32): ``"faiss_flat"`` (exact inner product), ``"faiss_ivf"`` (inverted
            lists: ``nlist`` k-means cells, ``nprobe`` searched; approximate) or ``"faiss_hnsw"`` (graph with
            ``hnsw_m`` links and search depth ``ef_search``; approximate). An approximate index can miss true
            neighbours, so its k-th similarity is at most the exact one: a score is then higher (more OOD) than
            exact, never lower. Under a sharded DDP fit each rank indexes its own share.
        nlist, nprobe, hnsw_m, ef_search: the faiss index settings (see ``index``).
        bank_placement: ``"sharded"`` or ``"replicated"`` under DDP (see above; no effect in one process).
        name: log key; defaults to ``"knn"``.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"features"})
    needs_fit: ClassVar[bool] = True

    bank: Tensor
    faiss_index: Tensor

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
        bank_placement: str = "sharded",
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
        if bank_placement not in PLACEMENTS:
            raise ValueError(f"KNN bank_placement must be one of {list(PLACEMENTS)}, got {bank_placement!r}")
        check_index(index, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
        super().__init__(name)
        self.k = k
        self.chunk_size = chunk_size
        self.bank_dtype = bank_dtype
        self.bank_fraction = bank_fraction
        self.seed = seed
        self.index = index
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search = nlist, nprobe, hnsw_m, ef_search
        self.bank_placement = bank_placement
        self.register_buffer("bank", torch.empty(0, dtype=_BANK_DTYPES[bank_dtype]))
        # The built IVF / HNSW index of a one-process fit (faiss.serialize_index bytes), saved with the fit cache.
        self.register_buffer("faiss_index", torch.empty(0, dtype=torch.uint8))
        self._parts: list[Tensor] = []
        self._search: FaissSearch | None = None
        self._followers: list[KNN] = []  # detectors that take this one's bank when it finalizes
        self.bank_index = torch.empty(0, dtype=torch.long)  # the dataset index of each local bank row

    def extra_repr(self) -> str:
        # bank_placement is left out: it changes where rows live, not the scores.
        text = f"k={self.k}, chunk_size={self.chunk_size}, bank_dtype={self.bank_dtype!r}"
        # Options only when set, so the default's fingerprint (and the fit caches keyed by it) stays the same.
        if self.bank_fraction != 1.0:
            text += f", bank_fraction={self.bank_fraction}, seed={self.seed}"
        if self.index != "exact":
            text += f", index={self.index!r}, " + index_settings(self)
        return text

    def reset(self) -> None:
        super().reset()
        self._parts, self._search = [], None
        self.faiss_index = self.faiss_index.new_empty(0)

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        """Append the L2-normalised ``[B, D]`` features of one ID-train batch to this rank's bank."""
        part_dtype = at_least_float32_dtype(_BANK_DTYPES[self.bank_dtype])
        self._parts.append(normalize(batch.features).to(part_dtype))

    def select_rows(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's bank rows ``[n, D]`` and their dataset indices ``[n]`` to keep (before any gather):
        the ``bank_fraction`` subset. Subclasses may drop more rows."""
        if self.bank_fraction == 1:
            return rows, index
        total = int(all_reduce_sum(torch.tensor([len(index)], device=index.device)).item())
        keep = torch.isin(index, subset_rows(total, self.bank_fraction, self.seed).to(index.device))
        return rows[keep], index[keep]

    def finalize(self) -> None:
        """Keep this rank's (subsampled) rows as its bank share, or gather them with ``"replicated"``.

        A collective: every rank must call it, also one that got no fit batch (it contributes no rows). Raises
        on every rank when no rank saw any feature, or when the bank has fewer than ``k`` rows.
        """
        rows, index, _ = self.agreed_rows(self._parts)
        self._parts = []
        rows, index = self.select_rows(rows, index)
        _, world = distributed_world()
        total = int(all_reduce_sum(torch.tensor([len(rows)], device=rows.device)).item())
        if total < self.k:
            raise ValueError(f"KNN k={self.k} exceeds the bank size {total}")
        if world > 1 and self.bank_placement == "replicated":
            rows, index = all_gather_cat(rows), all_gather_cat(index)
        self.keep_rows(
            rows.to(_BANK_DTYPES[self.bank_dtype]).contiguous(), sharded=world > 1 and self.sharded_placement
        )
        self.bank_index = index
        self._build_index()
        super().finalize()
        followers, self._followers = self._followers, []
        for det in followers:
            det._adopt_bank(self, total)

    def fit_state_key(self) -> str | None:
        """Every plain KNN with the same bank settings keeps the same bank, whatever its ``k`` or index."""
        if type(self) is not KNN:  # a subclass may choose other rows
            return None
        return f"KNN(bank_dtype={self.bank_dtype}, bank_fraction={self.bank_fraction}, seed={self.seed}, " + (
            f"bank_placement={self.bank_placement})"
        )

    def share_fit_with(self, followers: list[Detector]) -> None:
        self._followers = [det for det in followers if isinstance(det, KNN)]

    def _adopt_bank(self, leader: KNN, total: int) -> None:
        """Fitted from ``leader``'s bank (the same tensor, not a copy), with this detector's ``k`` and index."""
        if total < self.k:
            raise ValueError(f"KNN k={self.k} exceeds the bank size {total}")
        self.share_rows_of(leader)
        self.bank_index = leader.bank_index
        self._build_index()
        self._fitted.fill_(True)

    def _build_index(self) -> None:
        """Build the faiss index (if any) of this rank's bank; keep it as bytes unless it is a shard's, or flat
        (which rebuilds from the bank as fast as it loads)."""
        self._search = None
        self.faiss_index = self.faiss_index.new_empty(0)
        if self.index == "exact":
            return
        self._search = FaissSearch(self.rows, self.index, **index_kwargs(self))
        if not self.sharded and self.index != "faiss_flat":
            self.faiss_index = self._search.serialized()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._search, self.shard, self._rounds = (
            None,
            None,
            None,
        )  # a new bank: its index is loaded or rebuilt
        # A state (a fit cache) written before the faiss index was kept has none: the index is rebuilt.
        state_dict.setdefault(prefix + "faiss_index", torch.empty(0, dtype=torch.uint8))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.bank_index = torch.arange(len(self.bank))
        rank, world = distributed_world()
        if world > 1 and self.sharded_placement and self.fitted:
            # A one-process fit (the fit cache) loaded under DDP: every rank keeps its every-W-th share.
            self.split_loaded_bank()
            self.bank_index = self.bank_index[rank::world]
            self.faiss_index = self.faiss_index.new_empty(0)

    def _faiss(self) -> FaissSearch:
        if self._search is None:
            if self.faiss_index.numel():
                self._search = FaissSearch.load(self.faiss_index, self.rows.device)
            else:
                self._search = FaissSearch(self.rows, self.index, **index_kwargs(self))
        return self._search

    @property
    def sharded_placement(self) -> bool:
        return self.bank_placement == "sharded"

    def shards_under_ddp(self) -> bool:
        return self.sharded_placement

    def share_state(self) -> dict[str, Tensor]:
        """The share, its dataset indices and its built IVF / HNSW index (a flat one rebuilds as fast)."""
        state = {**super().share_state(), "bank_index": self.bank_index}
        if self.index not in ("exact", "faiss_flat"):
            state["faiss_index"] = self._faiss().serialized()
        return state

    def load_share(self, state: dict[str, Tensor]) -> None:
        super().load_share(state)
        self.bank_index = state["bank_index"].clone()
        if "faiss_index" in state:
            self._search = FaissSearch.load(state["faiss_index"], self.rows.device)
        else:
            self._build_index()

    def local_topk(self, queries: Tensor, k: int) -> Tensor:
        """``[Q, k]`` the k largest similarities of ``queries`` in this rank's bank (``-inf`` padded)."""
        if self.index != "exact":
            return self._faiss().topk(queries, k)
        return pad_topk(topk_cosines(queries, self.rows, k, self.chunk_size), k)

    def round_k(self) -> int:
        return self.k

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` scores ``-cos_(k)`` for ``batch.features`` of shape ``[B, D]``; higher = more OOD."""
        queries = normalize(batch.features)
        if self._rounds is not None:
            return -unknown_as_lowest(self._rounds.kth(queries, self.local_topk, self.k))
        if self.index == "exact":
            return -kth_largest_cosine(queries, self.bank, self.k, self.chunk_size)
        return -self._faiss().kth_largest(queries, self.k)


def normalize(features: Tensor | None) -> Tensor:
    """``[B, D]`` rows scaled to unit L2 norm (computed in float64; zero rows stay zero), returned in the
    features' dtype promoted to at least float32 (float64 stays float64)."""
    if features is None:
        raise ValueError("KNN needs `features`")
    out_dtype = at_least_float32_dtype(features.dtype)
    return F.normalize(features.detach().double().flatten(1), dim=1).to(out_dtype)
