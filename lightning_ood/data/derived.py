"""Test sets that are computed at test time from the data and the model under test (e.g. adversarial images).

A :class:`TestSetBuilder` is configured in the data config (``data.init_args.test_set_builders``, a list of
``class_path`` / ``init_args``). It names its sets and their groups at construction (no I/O), so that
``test_set_names`` is known before anything is built; :class:`~lightning_ood.data.OODDataModule` asks it to
build them the first time the test loaders are requested, which Lightning does after the tested checkpoint is
loaded and the model is on its device (and before the test hooks). Every DDP rank calls :meth:`build`;
builders may use collectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

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
