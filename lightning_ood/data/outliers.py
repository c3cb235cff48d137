"""The auxiliary outliers: their split into a training and a held-out part, and the DataModule's loaders of them."""

from __future__ import annotations

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_ood.data.datasets import ImageDataset, derived_rng
from lightning_ood.data.disjoint import check_aux_disjoint
from lightning_ood.distributed import distributed_world


def split_outliers(aux: ImageDataset, val_fraction: float, seed: int) -> dict[str, Dataset]:
    """``{"aux": training outliers (augmented as ``aux``), "aux_val": held-out outliers, "aux_all": every
    outlier}``, the last two not augmented.

    ``round(val_fraction * N)`` outliers, a seeded random choice (``seed``, key ``"aux/val"``), are held out; they
    never appear in ``"aux"``. With ``val_fraction == 0`` ``"aux"`` is ``aux`` itself and ``"aux_val"`` is empty.
    """
    plain = ImageDataset(aux.images, aux.targets)  # the same images, not augmented
    n_val = round(val_fraction * len(aux))
    if n_val == 0:
        return {"aux": aux, "aux_val": Subset(plain, []), "aux_all": plain}
    if n_val == len(aux):
        raise ValueError(
            f"aux_val_fraction={val_fraction} holds out all {len(aux)} auxiliary outliers: none would be left "
            "for training; lower data.init_args.aux_val_fraction or use a larger aux_set"
        )
    order = derived_rng(seed, "aux/val").permutation(len(aux))
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    return {
        "aux": Subset(aux, train_rows.tolist()),
        "aux_val": Subset(plain, val_rows.tolist()),
        "aux_all": plain,
    }


class AuxiliaryOutliers:
    """``OODDataModule``'s auxiliary outliers: built on first use, split, and served by the loaders below.

    A mixin of :class:`~lightning_ood.data.datamodule.OODDataModule`; it reads the data module's settings
    (``aux_set``, ``ood_val_set``, ``aux_augmentation``, ``aux_val_fraction``, ``seed``, batch sizes) and
    state (``_splits``, ``_test_sets``, ``_loaders``).
    """

    def _build_aux(self) -> ImageDataset:
        """The auxiliary outliers, built on first use (a method that trains without them never pays for them)."""
        if "aux" not in self._splits:
            if self.aux_set is None:
                raise RuntimeError(
                    "auxiliary outliers were asked for, but the data config has no aux_set: set "
                    "data.init_args.aux_set (e.g. {source: aux_photos}); it must be disjoint from every test set"
                )
            augment = self._augmentation(self.aux_augmentation)
            aux = self._outliers(self.aux_set, "aux", augment, {})
            if len(aux) == 0:
                raise ValueError("aux_set has no images after class selection and limit")
            # Sets derived at test time (attacked images, float) come from the sets checked here.
            tests = {k: d.images for k, d in self._test_sets.items() if k not in self._derived_groups}
            check_aux_disjoint(aux.images, tests, f"aux_set ({self.aux_set.source})")
            self._splits.update(split_outliers(aux, self.aux_val_fraction, self.seed))
            rank_zero_info(
                f"OODDataModule: {len(self._splits['aux'])} auxiliary outliers for training, "
                f"{len(self._splits['aux_val'])} held out for validation ({self.aux_set.source})"
            )
        return self._splits["aux"]

    def _build_ood_val(self) -> ImageDataset:
        """The benchmark's OOD validation set (``ood_val_set``, targets -1, not augmented), built on first use."""
        if "ood_val" not in self._splits:
            if self.ood_val_set is None:
                raise RuntimeError(
                    "an OOD validation set was asked for, but the data config has no ood_val_set"
                )
            ood_val = self._outliers(self.ood_val_set, "ood_val", None, {})
            if len(ood_val) == 0:
                raise ValueError("ood_val_set has no images after class selection and limit")
            self._splits["ood_val"] = ood_val
            rank_zero_info(f"OODDataModule: {len(ood_val)} OOD validation images ({self.ood_val_set.source})")
        return self._splits["ood_val"]

    def aux_fit_dataloader(self, sharded: bool = True) -> DataLoader:
        """Every auxiliary outlier (training and held-out part), **not augmented**, not shuffled: for precomputing
        per-outlier training targets. Sharded under DDP as :meth:`fit_dataloader` (each outlier on exactly one
        rank: rows ``r, r + W, ...``; put the shares together with
        :func:`~lightning_ood.methods.heatmap_targets.gather_described`); ``sharded=False``: every rank gets
        every outlier."""
        if sharded:
            return self._loaders.unpadded(self._dataset_for("aux_all"))
        return self._loaders.plain(self._dataset_for("aux_all"), self.eval_batch_size, shuffle=False)

    def aux_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Auxiliary outliers (targets ``-1``), augmented, shuffled, a different order on every DDP rank.

        Methods get outliers through :meth:`train_dataloader` (``uses_outliers``); this loader is for work outside
        the training loop (e.g. precomputing targets for the outliers), with ``batch_size`` (default:
        ``aux_batch_size``) per step.
        """
        rank, _ = distributed_world()
        return self._loaders.shuffled(
            self._dataset_for("aux"), f"shuffle/aux/{rank}", batch_size or self.aux_batch_size
        )

    def aux_eval_dataloader(self) -> DataLoader:
        """Auxiliary outliers (targets ``-1``), **not augmented**, in order, each scored once under DDP: the
        OOD side of the detector search (``DetectorSearch``), never a test set. The benchmark's OOD validation
        set when there is one (``ood_val_set``, e.g. OpenOOD's ``val_tin``: how OpenOOD v1.5 chooses
        hyperparameters); else the held-out part (``aux_val_fraction > 0``) when there is one, so a method
        trained on outliers is not searched on the outliers it saw; else every outlier."""
        if self.ood_val_set is not None:
            return self._loaders.unpadded(self._dataset_for("ood_val"))
        held_out = self._dataset_for("aux_val")
        return self._loaders.unpadded(held_out if len(held_out) else self._dataset_for("aux_all"))
