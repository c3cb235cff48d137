"""NNGuide: the energy score guided by the similarity to a bank of energy-weighted ID-training features."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import Detector, DetectorInputs
from lightning_ood.detectors.gather import gather_rows
from lightning_ood.detectors.streaming import features_of, logits_of


class NNGuide(Detector):
    """Nearest-neighbour guidance (Park et al., ICCV 2023, "Nearest neighbor guidance for out-of-distribution
    detection", eq. 3-5), negated: ``-E(x) * 1/k sum_{top k} <f(x) / ||f(x)||, E(z) f(z) / ||f(z)||>``.

    ``E = logsumexp(logits)`` (the energy confidence), ``f`` the ``[B, D]`` features; the bank holds every fit
    sample's normalised feature times its energy, and the guidance is the mean of the ``k`` largest inner
    products with it. Memory: the bank, ``N_bank * D`` float32 on the detector's device (gathered from every
    rank in :meth:`finalize`); scoring is a chunked ``[B, D] x [D, N_bank]`` product, like exact KNN, so it is
    opt-in. ``bank_fraction`` keeps a seeded random share of the fit rows (the paper uses 1 % of ImageNet).

    Args:
        k: neighbours ``>= 1``; 100 (the paper's ImageNet setting; capped at the bank size).
        bank_fraction: share of fit rows kept in ``(0, 1]``; 1.
        seed: seed of the row selection.
        chunk_size: bank rows per product.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"logits", "features"})
    needs_fit: ClassVar[bool] = True
    default_name = "nn_guide"

    bank: Tensor

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
        self.register_buffer("bank", torch.empty(0))  # [N_bank, D]
        self._rows: list[Tensor] = []
        self._generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        return f"k={self.k}, bank_fraction={self.bank_fraction}, seed={self.seed}"

    def reset(self) -> None:
        super().reset()
        self._rows, self._generator = [], None

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        rows = guided_rows(features_of(batch, "NNGuide"), logits_of(batch, "NNGuide"))
        if self.bank_fraction < 1:
            if self._generator is None:
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank)
            keep = torch.rand(rows.shape[0], generator=self._generator) < self.bank_fraction
            rows = rows[keep.to(rows.device)]
        self._rows.append(rows)

    def finalize(self) -> None:
        local = torch.cat(self._rows) if self._rows else None
        self._rows = []
        self.bank = gather_rows(local, device=self.bank.device, who=self.name).to(self.bank.device)
        super().finalize()

    def score(self, batch: DetectorInputs) -> Tensor:
        """``[B]`` negated guided energy; higher = more OOD."""
        feats = features_of(batch, "NNGuide")
        energy = torch.logsumexp(logits_of(batch, "NNGuide"), dim=1)
        bank = self.bank.to(feats.device)
        queries = F.normalize(feats, dim=1).to(bank.dtype)
        k = min(self.k, bank.shape[0])
        top = queries.new_empty(queries.shape[0], 0)
        for chunk in bank.split(self.chunk_size):
            top = (
                torch.cat([top, queries @ chunk.mT], dim=1)
                .topk(min(k, top.shape[1] + chunk.shape[0]), dim=1)
                .values
            )
        return -(top.mean(dim=1).to(energy.dtype) * energy)


def guided_rows(features: Tensor, logits: Tensor) -> Tensor:
    """``[B, D]`` bank rows ``E(z) f(z) / ||f(z)||`` with ``E = logsumexp(logits)``."""
    return F.normalize(features, dim=1) * torch.logsumexp(logits, dim=1, keepdim=True).to(features.dtype)
