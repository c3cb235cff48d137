"""The auxiliary outlier set split into a training part and a held-out validation part."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

from lightning_ood.data.datasets import ImageDataset, derived_rng


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
