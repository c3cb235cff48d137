"""k-NN with the attack targets removed from the bank: the paper's "without the targets" evaluation."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from lightning_ood.detectors.knn import KNN


class KNNWithoutTargets(KNN):
    """:class:`~lightning_ood.detectors.KNN` whose bank leaves out the ID training images that test-set builders
    derived their sets from (the targets of :class:`~lightning_ood.attacks.AttackedSets`).

    A feature-matching attack pulls an OOD image onto the embedding of one ID training image; with that image in
    the k-NN bank (plain ``KNN``), the attacked image's nearest neighbour is its own target and it looks ID
    trivially. Adaloglou et al. (TMLR 2024, Sec. 5) therefore also score with the targets removed from the bank
    (the ID test images are scored against the same reduced bank). Scores as ``KNN``: ``-cos_(k)``, higher = more
    OOD. The rows to drop are read from ``datamodule.test_set_builders`` when testing starts (after the attacked
    sets are built); each rank drops them from its share of the bank by dataset index, so DDP fits drop the
    same images.

    Args: as :class:`~lightning_ood.detectors.KNN`; ``name`` defaults to ``"knn_without_targets"``.
    """

    default_name = "knn_without_targets"

    def __init__(
        self, k: int = 1, chunk_size: int = 8192, bank_dtype: str = "float32", name: str | None = None
    ) -> None:
        super().__init__(k=k, chunk_size=chunk_size, bank_dtype=bank_dtype, name=name or self.default_name)
        self.excluded = np.empty(0, dtype=np.int64)

    def configure(self, datamodule: object | None) -> None:
        builders = getattr(datamodule, "test_set_builders", None) or []
        rows = [np.asarray(b.fit_rows_used, dtype=np.int64) for b in builders]
        self.excluded = np.unique(np.concatenate(rows)) if rows else np.empty(0, dtype=np.int64)
        if not len(self.excluded):
            raise ValueError(
                f"detector {self.name!r} removes attack targets from the k-NN bank, but the data config has no "
                "test set builder with targets (data.init_args.test_set_builders, e.g. AttackedSets)"
            )

    def extra_repr(self) -> str:
        digest = hashlib.sha1(self.excluded.tobytes()).hexdigest()[:12]
        return f"{super().extra_repr()}, excluded={len(self.excluded)} rows ({digest})"

    def select_rows(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``KNN``'s rows without the excluded ID-train images (by dataset index, on each rank's share)."""
        rows, index = super().select_rows(rows, index)
        keep = torch.from_numpy(~np.isin(index.cpu().numpy(), self.excluded)).to(index.device)
        return rows[keep], index[keep]
