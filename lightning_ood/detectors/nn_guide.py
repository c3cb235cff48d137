"""NNGuide: the energy score guided by the similarity to a bank of energy-weighted ID-training features."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import DetectorInputs, all_reduce_sum
from lightning_ood.detectors.knn_index import subset_rows
from lightning_ood.detectors.knn_shards import pad_topk
from lightning_ood.detectors.sharded_bank import ShardedBank
from lightning_ood.detectors.streaming import features_of, logits_of
from lightning_ood.distributed import distributed_world


class NNGuide(ShardedBank):
    """Nearest-neighbour guidance (Park et al., ICCV 2023, "Nearest neighbor guidance for out-of-distribution
    detection", eq. 3-5), negated: ``-E(x) * 1/k sum_{top k} <f(x) / ||f(x)||, E(z) f(z) / ||f(z)||>``.

    ``E = logsumexp(logits)`` (the energy confidence), ``f`` the ``[B, D]`` features; the bank holds every fit
    sample's normalised feature times its energy, and the guidance is the mean of the ``k`` largest inner
    products with it. Memory: the bank, ``N_bank * D`` float32 on the detector's device; under DDP each rank
    keeps only its share (``N_bank / W``) and a query's top ``k`` is merged across ranks with one collective
    round per scored batch, as KNN's sharded bank (:mod:`~lightning_ood.detectors.sharded_bank`): the bank is
    never gathered. Scoring is a chunked ``[B, D] x [D, N_bank]`` product, like exact KNN, so it is opt-in.
    ``bank_fraction`` keeps a seeded random share of the fit rows (the paper uses 1 % of ImageNet), drawn over
    the rows' dataset indices before any communication, so DDP keeps the same rows as one process.

    Args:
        k: neighbours ``>= 1``; 100 (the paper's ImageNet setting; capped at the bank size).
        bank_fraction: share of fit rows kept in ``(0, 1]``; 1.
        seed: seed of the row selection.
        chunk_size: bank rows per product.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"logits", "features"})
    needs_fit: ClassVar[bool] = True
    default_name = "nn_guide"

    def __init__(
        self,
        k: int = 100,
        bank_fraction: float = 1.0,
        seed: int = 0,
        chunk_size: int = 16384,
        name: str | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"NNGuide k must be >= 1, got {k}")
        if not 0 < bank_fraction <= 1:
            raise ValueError(f"NNGuide bank_fraction must be in (0, 1], got {bank_fraction}")
        super().__init__(name)
        self.k, self.bank_fraction, self.seed, self.chunk_size = k, bank_fraction, seed, chunk_size
        self.register_buffer("bank", torch.empty(0))  # [N_bank, D]: one process (a sharded fit: empty)
        self.register_buffer("bank_size", torch.tensor(0))  # N_bank over every rank
        self._parts: list[Tensor] = []

    def extra_repr(self) -> str:
        return f"k={self.k}, bank_fraction={self.bank_fraction}, seed={self.seed}"

    def reset(self) -> None:
        super().reset()
        self._parts = []

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        self._parts.append(guided_rows(features_of(batch, "NNGuide"), logits_of(batch, "NNGuide")))

    def finalize(self) -> None:
        """Keep this rank's (subsampled) rows; a collective every rank enters, also one without fit batches."""
        rows, index, n = self.agreed_rows(self._parts)
        self._parts = []
        if self.bank_fraction < 1:
            rows = rows[torch.isin(index, subset_rows(n, self.bank_fraction, self.seed).to(index.device))]
        total = int(all_reduce_sum(torch.tensor([len(rows)], device=rows.device)).item())
        _, world = distributed_world()
        self.keep_rows(rows.contiguous(), sharded=world > 1)
        self.bank_size.fill_(total)
        super().finalize()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.shard, self._rounds = None, None
        state_dict.setdefault(prefix + "bank_size", torch.tensor(len(state_dict.get(prefix + "bank", ()))))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.split_loaded_bank()  # a one-process fit loaded under DDP: every rank keeps its share

    def share_state(self) -> dict[str, Tensor]:
        return {**super().share_state(), "bank_size": self.bank_size}

    def load_share(self, state: dict[str, Tensor]) -> None:
        super().load_share(state)
        self.bank_size.fill_(int(state["bank_size"]))

    def round_k(self) -> int:
        return min(self.k, int(self.bank_size))

    def local_topk(self, queries: Tensor, k: int) -> Tensor:
        """``[Q, k]`` the ``k`` largest inner products with this rank's rows (``-inf`` padded)."""
        bank = self.rows.to(queries.device, queries.dtype)
        top = queries.new_empty(queries.shape[0], 0)
        for chunk in bank.split(self.chunk_size):
            top = torch.cat([top, queries @ chunk.mT], dim=1)
            top = top.topk(min(k, top.shape[1]), dim=1).values
        return pad_topk(top, k)

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negated guided energy; higher = more OOD."""
        feats = features_of(batch, "NNGuide")
        energy = torch.logsumexp(logits_of(batch, "NNGuide"), dim=1)
        queries = F.normalize(feats, dim=1).to(
            self.rows.dtype if self.rows.is_floating_point() else feats.dtype
        )
        top = self.merged_topk(queries)
        return -(top.mean(dim=1).to(energy.dtype) * energy)


def guided_rows(features: Tensor, logits: Tensor) -> Tensor:
    """``[B, D]`` bank rows ``E(z) f(z) / ||f(z)||`` with ``E = logsumexp(logits)``."""
    return F.normalize(features, dim=1) * torch.logsumexp(logits, dim=1, keepdim=True).to(features.dtype)
