"""``OODDataModule``: the ID set (train/val/test), named near/far OOD test sets, auxiliary outliers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_ood.contract import ID_KEY, OUTLIER_KEY
from lightning_ood.data.datasets import (
    SOURCES,
    AuxSetSpec,
    IDSetSpec,
    ImageDataset,
    OODSetSpec,
    derived_rng,
    limit_indices,
    load_split,
    make_images,
    resolve_split,
    select_classes,
)
from lightning_ood.data.derived import TestSetBuilder, build_derived_sets
from lightning_ood.data.folder_scoring import FolderScoring
from lightning_ood.data.id_splits import fit_fingerprint, id_set_name, load_id_part, prepare_sources
from lightning_ood.data.loaders import LoaderFactory
from lightning_ood.data.outliers import AuxiliaryOutliers
from lightning_ood.data.set_checks import (
    check_ood_val_set,
    check_other_sets,
    derived_set_groups,
    native_value,
    per_channel,
    set_summary,
)
from lightning_ood.data.sources import RawSet
from lightning_ood.data.transforms import NormalizeCollate, default_augmentation

Augment = Callable[[Tensor], Tensor] | None


class OODDataModule(AuxiliaryOutliers, FolderScoring, LightningDataModule):
    """ID train/val/test sets, named test OOD sets and optional auxiliary outliers.

    Batches are ``(images, targets)``: images float ``[B, C, S, S]`` normalised with ``mean``/``std``; targets
    long ``[B]``, the ID class index, or ``-1`` for every OOD and auxiliary sample. ``__init__`` does no I/O;
    ``prepare_data`` downloads (only when ``download``); ``setup`` builds every set once. For a method that
    trains with outliers (``uses_outliers``), training batches are ``{"id": (images, targets), "outliers":
    (images, -1)}`` (Lightning's ``CombinedLoader``): the ID loader defines the epoch and the outlier set cycles
    in fresh permutations, sharded over DDP ranks. The outlier set is built only when something asks for it.

    Args:
        id_set: the in-distribution source (or a source per split: ``id_set.train`` / ``val`` / ``test``).
        ood_sets: the test OOD sets, in the order of ``test_set_names`` after ``"id"``.
        aux_set: auxiliary outliers for methods that train with them (e.g. outlier exposure, heatmap decoders).
        ood_val_set: a benchmark's OOD *validation* set (e.g. OpenOOD's ``val_tin``), never a test set: when
            given, the detector search (``DetectorSearch``) scores ID validation against it instead of against
            the auxiliary outliers (:meth:`aux_eval_dataloader`). Not used for training.
        root: folder for downloaded/local datasets (searched first for Fashion-MNIST).
        download: let ``prepare_data`` download torchvision datasets into ``root`` (needs a network).
        val_fraction: fraction of the ID train split held out for validation, seeded; in [0, 1); must be 0
            when ``id_set.val`` gives the validation images.
        train_limit, val_limit, test_limit: keep a seeded random subset of at most this many ID images.
        image_size: side ``S`` every image is resized to; ``None``: the ID source's native size.
        resize_size: resize the shorter side to this, then take the centre ``S`` x ``S`` (OpenOOD's ImageNet
            preprocessing: 256 then 224); image files are then resized with PIL exactly as torchvision's
            ``Resize`` + ``CenterCrop`` on PIL images (OpenOOD's test pipeline). ``None``: straight to ``S``.
        channels: 1 or 3, every set is converted to it; ``None``: the ID source's native channels.
        mean, std: per-channel normalisation of images scaled to [0, 1] (one value = every channel).
        train_transforms: augmentation of uint8 ``[C, S, S]`` images for training and aux outliers (e.g.
            ``torchvision.transforms.v2`` objects from YAML); ``None``: random crop with padding ``S // 8``
            and horizontal flip; ``[]``: none. They return uint8 (or float in [0, 1]) and must not normalise:
            batches are normalised after them. Evaluation never augments.
        aux_transforms: augmentation of the auxiliary outliers, as ``train_transforms``; ``None``: the same as
            ``train_transforms``.
        batch_size: training batch size; eval_batch_size: for val/test/fit loaders (``None``: ``batch_size``).
        aux_batch_size: outliers per training batch (``None``: ``batch_size``).
        aux_val_fraction: fraction of the auxiliary outliers held out (seeded) for validation, in [0, 1): never
            in training batches; a method that trains with outliers then validates on ``[id_val, aux_val]``
            (:meth:`val_dataloader`), so its validation loss sees outliers without touching any test set.
        num_workers: DataLoader workers per loader.
        seed: seeds the ID train/val split, every limit subset and the shuffling order.
        test_set_builders: test sets derived at test time from the data and the model under test (e.g.
            :class:`~lightning_ood.attacks.AttackedSets`), appended to ``test_set_names`` after ``ood_sets``
            and built when the test loaders are requested, again when the model's weights or the fit data
            changed (see :mod:`lightning_ood.data.derived`).
    """

    def __init__(
        self,
        id_set: IDSetSpec,
        ood_sets: list[OODSetSpec] | None = None,
        aux_set: AuxSetSpec | None = None,
        ood_val_set: AuxSetSpec | None = None,
        root: str | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        train_limit: int | None = None,
        val_limit: int | None = None,
        test_limit: int | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        channels: int | None = None,
        mean: float | list[float] = 0.5,
        std: float | list[float] = 0.5,
        train_transforms: list[nn.Module] | None = None,
        aux_transforms: list[nn.Module] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        aux_batch_size: int | None = None,
        aux_val_fraction: float = 0.0,
        num_workers: int = 0,
        seed: int = 0,
        test_set_builders: list[TestSetBuilder] | None = None,
    ) -> None:
        super().__init__()
        # transforms and builders are objects; the CLI's config keeps them
        self.save_hyperparameters(ignore=["train_transforms", "aux_transforms", "test_set_builders"])
        self.id_set, self.ood_sets, self.aux_set = id_set, list(ood_sets or []), aux_set
        self.ood_val_set, self.resize_size = ood_val_set, resize_size
        self.root, self.download, self.val_fraction, self.seed = root, download, val_fraction, seed
        self.limits = {"train": train_limit, "val": val_limit, "test": test_limit}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.aux_batch_size = aux_batch_size or batch_size
        self.num_workers = num_workers
        self.augmentation, self.aux_augmentation = train_transforms, aux_transforms
        native = SOURCES[id_set.source]
        self._num_classes = id_set.class_count
        self._channels = native_value(channels, native.channels, "channels", id_set.source)
        self._image_size = native_value(image_size, native.size, "image_size", id_set.source)
        if self._channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self._channels}")
        self._mean = per_channel(mean, self._channels, "mean")
        self._std = per_channel(std, self._channels, "std")
        check_other_sets(self.id_set, self.ood_sets, self.aux_set)
        check_ood_val_set(self.ood_val_set, self.id_set, self.ood_sets, val_fraction)
        if resize_size is not None and resize_size < self._image_size:
            raise ValueError(f"resize_size={resize_size} must be >= image_size={self._image_size}, or null")
        self.test_set_builders = list(test_set_builders or [])
        self._derived_groups = derived_set_groups(self.test_set_builders, self.ood_sets)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0 <= aux_val_fraction < 1:
            raise ValueError(f"aux_val_fraction must be in [0, 1), got {aux_val_fraction}")
        self.aux_val_fraction = aux_val_fraction
        sizes = {
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "aux_batch_size": aux_batch_size,
        }
        for key, value in [*((f"{k}_limit", v) for k, v in self.limits.items()), *sizes.items()]:
            if value is not None and value < 1:
                raise ValueError(f"{key} must be a positive integer or null, got {value}")
        # train, val, fit (train, not augmented); aux, aux_val, aux_all (every outlier, not augmented) on first use
        self._splits: dict[str, Dataset] = {}
        self._test_sets: dict[str, ImageDataset] = {}  # keyed by test_set_names
        self._class_names: list[str] | None = None
        self._loaders = LoaderFactory(
            NormalizeCollate(self._mean, self._std), num_workers, self.eval_batch_size, seed
        )
        self._predict: tuple[list[Path], ImageDataset] | None = None

    # ----------------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        """Number of ID classes (known at construction, no I/O)."""
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        """ID class names, index ``k`` = target ``k`` (after ``setup``)."""
        if self._class_names is None:
            raise RuntimeError("class_names are known after setup()")
        return self._class_names

    @property
    def test_set_names(self) -> list[str]:
        """``["id", *OOD set names, *derived set names]``: the order of :meth:`test_dataloader`
        (``dataloader_idx``)."""
        return ["id", *(s.name for s in self.ood_sets), *self._derived_groups]

    @property
    def test_set_groups(self) -> dict[str, str]:
        """``{ood_set_name: "near" | "far"}``."""
        return {**{s.name: s.group for s in self.ood_sets}, **self._derived_groups}

    @property
    def dataset_name(self) -> str:
        """Short ID-set name for tracking, e.g. ``"fashionmnist"``, ``"fashionmnist[0-5]"`` or ``id_set.name``."""
        return id_set_name(self.id_set)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean (images in [0, 1]); ``x * std + mean`` undoes normalisation."""
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation standard deviation."""
        return self._std

    @property
    def channels(self) -> int:
        """Channels ``C`` of every batch's images (1 or 3)."""
        return self._channels

    @property
    def image_size(self) -> int:
        """Side ``S`` of every batch's images."""
        return self._image_size

    # ----------------------------------------------------------------------------------- building
    def prepare_data(self) -> None:
        """Download the sources that need it (only when ``download``), and run the checks that are too costly
        for every rank at every start, once per node (e.g. that every file of an image list or image folder is
        an image; remembered, so that ``setup`` on every rank only reads the result)."""
        others = [(s, s.name) for s in self.ood_sets]
        others += [
            (spec, key)
            for spec, key in ((self.aux_set, "aux_set"), (self.ood_val_set, "ood_val_set"))
            if spec
        ]
        prepare_sources(self.id_set, others, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        """Build every set once (later calls are no-ops) and log a summary on rank 0."""
        if self._test_sets:
            return
        cache: dict[str, RawSet] = {}
        augment = self._augmentation()
        raw, idx, labels = load_id_part(self.id_set, "train", self.root, cache)
        names = [raw.class_names[c] for c in self.id_set.classes] if self.id_set.classes else raw.class_names
        if len(names) != self._num_classes:
            raise ValueError(f"id_set.num_classes={self._num_classes} but the data has {len(names)} classes")
        self._class_names = list(names)
        if self.id_set.val is not None:  # a source of its own: every train image trains
            rows = {"train": self._limit(np.arange(len(idx)), "train")}
        else:
            order = derived_rng(self.seed, "id/val").permutation(len(idx))
            n_val = round(self.val_fraction * len(idx))
            rows = {
                part: self._limit(np.sort(o), part)
                for part, o in (("train", order[n_val:]), ("val", order[:n_val]))
            }
        train = self._dataset(raw, idx[rows["train"]], labels[rows["train"]], augment)
        if self.id_set.val is not None:
            val = self._id_part("val", cache)
        else:
            val = self._dataset(raw, idx[rows["val"]], labels[rows["val"]])
        # fit: the train images, not augmented
        self._splits = {"train": train, "val": val, "fit": ImageDataset(train.images, train.targets)}
        test_sets = {"id": self._id_part("test", cache)}
        for spec in self.ood_sets:
            test_sets[spec.name] = self._outliers(spec, f"ood/{spec.name}", None, cache)
        empty = [
            name for name, d in [*self._splits.items(), *test_sets.items()] if len(d) == 0 and name != "val"
        ]
        if empty:
            raise ValueError(f"these sets have no images after class selection and limits: {empty}")
        self._test_sets = test_sets
        rank_zero_info(self.summary())

    def _id_part(self, part: str, cache: dict[str, RawSet]) -> ImageDataset:
        """ID ``part`` (``"test"``, or ``"val"`` from its own source) with its ``<part>_limit``."""
        raw, idx, labels = load_id_part(self.id_set, part, self.root, cache)
        rows = self._limit(np.arange(len(idx)), part)
        return self._dataset(raw, idx[rows], labels[rows])

    def _load(
        self, spec: OODSetSpec | AuxSetSpec, split: str, where: str, cache: dict[str, RawSet]
    ) -> tuple[RawSet, np.ndarray, np.ndarray]:
        raw, idx = load_split(spec.source, split, spec.options, self.root, cache)
        return raw, *select_classes(raw, idx, spec.classes, where)

    def _limit(self, rows: np.ndarray, part: str) -> np.ndarray:
        return limit_indices(rows, self.limits[part], self.seed, f"id/{part}")

    def _outliers(
        self, spec: OODSetSpec | AuxSetSpec, key: str, augment: Augment, cache: dict[str, RawSet]
    ) -> ImageDataset:
        """An OOD or aux set with targets -1; ``key`` names it in errors and seeds its ``limit`` subset."""
        raw, idx, _ = self._load(spec, resolve_split(spec.source, spec.split, key), key, cache)
        idx = limit_indices(idx, spec.limit, self.seed, key)
        return self._dataset(raw, idx, np.full(len(idx), -1, dtype=np.int64), augment)

    def _dataset(
        self, raw: RawSet, idx: np.ndarray, targets: np.ndarray, augment: Augment = None
    ) -> ImageDataset:
        images = make_images(raw, idx, self._channels, self._image_size, self.resize_size)
        return ImageDataset(images, torch.from_numpy(targets).long(), augment)

    def _augmentation(self, steps: list[nn.Module] | None = None) -> Augment:
        steps = steps if steps is not None else self.augmentation
        steps = default_augmentation(self._image_size) if steps is None else steps
        return v2.Compose(list(steps)) if steps else None

    def summary(self) -> str:
        """A plain-text table of every set: name, group, source, split and size (after ``setup``)."""
        return set_summary(self)

    # ----------------------------------------------------------------------------------- loaders
    def _dataset_for(self, key: str) -> Dataset:
        """A built ID split or an aux split (built on first use); fails before ``setup``."""
        if not self._test_sets:
            raise RuntimeError("call setup() before asking for dataloaders")
        if key.startswith("aux"):
            self._build_aux()
        elif key == "ood_val":
            self._build_ood_val()
        return self._splits[key]

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """ID train split, augmented, shuffled (Lightning inserts its DistributedSampler under DDP).

        For a method that trains with outliers: ``CombinedLoader({"id": ..., "outliers": ...})`` whose epoch is
        the ID loader's (see the class docstring).
        """
        id_loader = self._loaders.shuffled(self._dataset_for("train"), "shuffle/train", self.batch_size)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not getattr(module, "uses_outliers", False):
            return id_loader
        outliers = self._loaders.cycling(
            self._dataset_for("aux"), self.aux_batch_size, len(self._dataset_for("train")), self.batch_size
        )
        return CombinedLoader({ID_KEY: id_loader, OUTLIER_KEY: outliers}, mode="min_size")

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """ID validation split, not augmented; ``[]`` when ``val_fraction`` is 0.

        For a method that trains with outliers, when ``aux_val_fraction > 0``: ``[id_val, aux_val]``
        (``dataloader_idx`` 0 and 1; the first may be empty), the held-out outliers not augmented.
        """
        dataset = self._dataset_for("val")
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "uses_outliers", False) and self.aux_val_fraction > 0:
            return [self._loaders.unpadded(dataset), self._loaders.unpadded(self._dataset_for("aux_val"))]
        return self._loaders.unpadded(dataset) if len(dataset) else []

    def test_dataloader(self) -> list[DataLoader]:
        """``[id_test, *ood_sets, *derived sets]`` in the order of :attr:`test_set_names`, not augmented.

        Builds the derived sets (``test_set_builders``) with the model under test, again whenever what they were
        built from changed (another checkpoint, other fit data: :mod:`lightning_ood.data.derived`).
        """
        self._dataset_for("fit")  # fails clearly before setup
        self._build_derived()
        # a rank with no image of a set gets one empty batch: Lightning would otherwise skip it, or the whole loop
        return [
            self._loaders.unpadded(self._test_sets[name], at_least_one_batch=True)
            for name in self.test_set_names
        ]

    def _build_derived(self) -> None:
        """(Re)build the derived sets whose fingerprint changed (another checkpoint: other attacked images)."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        build_derived_sets(self, self._test_sets, model)

    def test_dataset(self, name: str) -> ImageDataset:
        """The built test set ``name`` of :attr:`test_set_names` (uint8 or [0, 1] float images, targets)."""
        if name not in self._test_sets:
            raise KeyError(f"no built test set {name!r}; built: {sorted(self._test_sets)}")
        return self._test_sets[name]

    @property
    def fit_dataset(self) -> ImageDataset:
        """The ID training images detectors are fitted on (not augmented), in :meth:`fit_dataloader` order."""
        return self._dataset_for("fit")

    def fit_dataloader(self, sharded: bool = True) -> DataLoader:
        """ID **train** split, **not augmented**, not shuffled: for fitting detectors' statistics.

        ``sharded=False``: every rank gets every image (for work each rank repeats, e.g. a method's
        precomputed training targets).
        """
        if sharded:
            return self._loaders.unpadded(self._dataset_for("fit"))
        return self._loaders.plain(self._dataset_for("fit"), self.eval_batch_size, shuffle=False)

    def fit_fingerprint(self) -> dict[str, object]:
        """Everything that decides the detector-fit images and how they look (the fit cache's key): the ID
        source, classes and options, split seed, ``val_fraction``, ``train_limit``, image size, channels and
        normalisation. Evaluation never augments, so no transform enters."""
        return fit_fingerprint(self)
