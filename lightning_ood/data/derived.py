"""Test sets that are computed at test time from the data and the model under test (e.g. adversarial images).

A :class:`TestSetBuilder` is configured in the data config (``data.init_args.test_set_builders``, a list of
``class_path`` / ``init_args``). It names its sets and their groups at construction (no I/O), so that
``test_set_names`` is known before anything is built; :class:`~lightning_ood.data.OODDataModule` asks it to
build them the first time the test loaders are requested, which Lightning does after the tested checkpoint is
loaded and the model is on its device (and before the test hooks). Every DDP rank calls :meth:`build`;
builders may use collectives.

Built sets carry the fingerprint they were built from (:meth:`TestSetBuilder.derived_from`: by default the
model's weights, the fit data and the precision, ``lightning_ood.derived_state``); each time the test loaders
are requested (every ``trainer.test``) it is compared, on rank 0, and the sets are rebuilt when it differs, so a
second checkpoint tested in the same process is attacked through its own features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.derived_state import check_fresh, fingerprint, stamp

if TYPE_CHECKING:
    from lightning_ood.data.datamodule import OODDataModule
    from lightning_ood.data.datasets import ImageDataset, OODSetSpec


class TestSetBuilder:
    """Base class of builders of test sets derived at test time; subclasses implement both methods."""

    __test__ = False  # not a pytest test class

    def set_groups(self, ood_sets: list[OODSetSpec]) -> dict[str, str]:
        """``{name: "near" | "far"}`` of the sets :meth:`build` will return, in order (no I/O)."""
        raise NotImplementedError

    def build(self, datamodule: OODDataModule, model: Any) -> dict[str, ImageDataset]:
        """The sets named by :meth:`set_groups`: OOD images (targets ``-1``), uint8 or float in [0, 1].

        ``model`` is the method under test (its tested weights loaded, on its device) or ``None``.
        """
        raise NotImplementedError

    @property
    def fit_rows_used(self) -> np.ndarray:
        """Indices into the ID fit set (``datamodule.fit_dataset``) of images the built sets were derived
        from (e.g. an attack's targets); empty by default."""
        return np.empty(0, dtype=np.int64)

    def derived_from(self, datamodule: OODDataModule, model: Any) -> str:
        """The fingerprint the built sets depend on: the model's weights (content), the ID fit data, the
        precision and the builder's settings. Override when a builder reads more (or less)."""
        weights = model.weights_fingerprint() if hasattr(model, "weights_fingerprint") else repr(model)
        trainer = datamodule.trainer
        precision = str(trainer.precision) if trainer is not None else ""
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return fingerprint(weights=weights, data=datamodule.fit_fingerprint(), precision=precision,
                           builder=type(self).__qualname__, settings=settings)  # fmt: skip


def build_derived_sets(datamodule: OODDataModule, test_sets: dict[str, ImageDataset], model: Any) -> None:
    """(Re)build into ``test_sets`` the sets of every builder of ``datamodule`` whose fingerprint
    (:meth:`TestSetBuilder.derived_from`) differs from the one its sets were built from; reuse the others."""
    for builder in datamodule.test_set_builders:
        stamps, name = builder.__dict__.setdefault("_stamps", {}), "sets"
        expected = list(builder.set_groups(datamodule.ood_sets))
        what = f"{type(builder).__name__} sets {expected}"
        fresh, current = check_fresh(stamps, name, lambda b=builder: b.derived_from(datamodule, model), what)
        if fresh and all(set_name in test_sets for set_name in expected):
            continue
        sets = builder.build(datamodule, model)
        if list(sets) != expected:
            raise RuntimeError(f"{type(builder).__name__} built {list(sets)}, but declared {expected}")
        test_sets.update(sets)
        stamp(stamps, name, current)
        sizes = ", ".join(f"{set_name} ({len(d)})" for set_name, d in sets.items())
        rank_zero_info(f"OODDataModule: derived test sets {sizes}")
