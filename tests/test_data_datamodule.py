"""lightning_ood.data.OODDataModule: names, seeds, limits, loaders, errors, shipped configs (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (  # tests/data_helpers.py
    all_batches,
    tiny,
)
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser

from lightning_ood.data import (
    AuxSetSpec,
    IDSetSpec,
    OODDataModule,
    OODSetSpec,
    sources,
)
from lightning_ood.data.datasets import limit_indices
from lightning_ood.data.transforms import format_images

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "data").glob("*.yaml"))


# ----------------------------------------------------------------------------------- the DataModule
def test_names_groups_and_properties_without_io() -> None:
    dm = OODDataModule(
        IDSetSpec("fashionmnist", classes=[0, 1, 2, 3, 4, 5]),
        [OODSetSpec("b", "digits", "far"), OODSetSpec("a", "fashionmnist", "near", classes=[6, 7])],
        root="/nonexistent",
    )
    assert dm.num_classes == 6 and dm.dataset_name == "fashionmnist[0-5]"
    assert dm.test_set_names == ["id", "b", "a"] and dm.test_set_groups == {"b": "far", "a": "near"}
    assert (dm.channels, dm.image_size, dm.mean, dm.std) == (1, 28, (0.5,), (0.5,))
    with pytest.raises(RuntimeError, match="after setup"):
        _ = dm.class_names
    with pytest.raises(RuntimeError, match="setup"):
        dm.test_dataloader()


def test_same_seed_same_data_other_seed_other_split() -> None:
    def fit_and_val(seed: int) -> list[torch.Tensor]:
        dm = tiny(seed=seed, train_transforms=[])
        dm.setup()
        return [t for loader in (dm.fit_dataloader(), dm.val_dataloader()) for t in all_batches(loader)]

    a, b, c = fit_and_val(0), fit_and_val(0), fit_and_val(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])

    def train_order(seed: int) -> torch.Tensor:  # augmentation draws from torch's RNG (seed_everything)
        dm = tiny(seed=seed, train_transforms=[])
        dm.setup()
        return all_batches(dm.train_dataloader())[0]

    assert torch.equal(train_order(3), train_order(3)) and not torch.equal(train_order(3), train_order(4))


def test_limits_take_a_random_subset() -> None:
    kept = limit_indices(np.arange(1000), 50, seed=0, key="x")
    assert len(kept) == 50 == len(set(kept)) and list(kept) == sorted(kept) and kept.max() > 100
    assert not np.array_equal(kept, limit_indices(np.arange(1000), 50, seed=0, key="y"))
    dm = tiny(ood_sets=[OODSetSpec("noise", "uniform", "far", limit=5, options={"n": 40, "size": 8})])
    dm.setup()
    images, _ = all_batches(dm.test_dataloader()[1])
    pixels = torch.round((images * 0.5 + 0.5) * 255).to(torch.uint8)
    source = torch.from_numpy(sources.uniform(n=40, size=8, channels=3).images).permute(0, 3, 1, 2)
    rows = [
        int(np.flatnonzero([torch.equal(p, format_images(s[None], 1, 8)[0]) for s in source])[0])
        for p in pixels
    ]
    assert len(rows) == 5 and rows != list(range(5))


def test_fit_loader_is_the_train_split_unaugmented_in_order() -> None:
    dm = tiny()
    dm.setup()
    images, targets = all_batches(dm.fit_dataloader())
    train = dm.train_dataloader().dataset
    assert torch.equal(targets, train.targets) and len(images) == 60
    assert torch.allclose(images, (train.images.float() / 255 - 0.5) / 0.5)
    assert train.augment is not None and dm.fit_dataloader().dataset.augment is None


def test_train_transforms_from_yaml_and_empty(tmp_path: Path) -> None:
    config = tmp_path / "data.yaml"
    config.write_text(
        "class_path: lightning_ood.data.OODDataModule\n"
        "init_args:\n  id_set: {source: digits}\n  image_size: 16\n  train_transforms:\n"
        "    - class_path: torchvision.transforms.v2.RandomResizedCrop\n"
        "      init_args: {size: 16, scale: [0.2, 1]}\n"
        "    - class_path: torchvision.transforms.v2.RandomHorizontalFlip\n"
    )
    dm = parse_data_config(config)
    assert [type(t).__name__ for t in dm.augmentation] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    dm.setup()
    assert next(iter(dm.train_dataloader()))[0].shape == (128, 1, 16, 16)
    dm = tiny(train_transforms=[])
    dm.setup()
    assert dm.train_dataloader().dataset.augment is None


def test_aux_loader() -> None:
    with pytest.raises(RuntimeError, match="aux_set"):
        dm = tiny()
        dm.setup()
        dm.aux_dataloader()
    dm = tiny(aux_set=AuxSetSpec(options={"n": 20, "crop_size": 8}))
    dm.setup()
    images, targets = all_batches(dm.aux_dataloader())
    assert images.shape == (20, 1, 8, 8) and (targets == -1).all()


DIGITS = IDSetSpec("digits")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ood_sets=[OODSetSpec("a", "faces", "far")] * 2), "unique"),
        (dict(ood_sets=[OODSetSpec("d", "digits", "far")]), "same source and classes"),
        (dict(id_set=IDSetSpec("digits", [0, 1]), ood_sets=[OODSetSpec("d", "digits", "near", [1, 2])]),
         "same source and classes"),
        (dict(ood_sets=[OODSetSpec("p", "photos", "far")], aux_set=AuxSetSpec("photos")), "aux_set"),
        (dict(channels=2), "channels must be 1 or 3"),
        (dict(channels=3, mean=[0.5, 0.5]), "mean needs 1 or 3 values"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(test_limit=0), "test_limit"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OODDataModule(**{"id_set": DIGITS, **kwargs})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: IDSetSpec("nope"), "unknown source 'nope'; available: aux_photos, cifar10"),
        (lambda: OODSetSpec("x", "nope", "far"), r"OOD set 'x'.source: unknown source.*fashionmnist"),
        (lambda: OODSetSpec("x", "faces", "mid"), r"^OOD set 'x'.group: must be one of \['near', 'far'\], got 'mid'$"),
        (lambda: OODSetSpec("x", "faces", "far", options={"nn": 3}), r"options: 'faces' has no option 'nn'"),
        (lambda: OODSetSpec("x", "gaussian", "far", options={"nn": 3}), r"it takes \['n', 'size'"),
        (lambda: OODSetSpec("x", "fashionmnist", "far", split="all"), r"x'.split: .*\['train', 'test'\]"),
        (lambda: IDSetSpec("gaussian"), "unlabelled"),
        (lambda: IDSetSpec("digits", classes=[3, 3]), "distinct"),
        (lambda: IDSetSpec("digits", classes=[10]), r"\[0, 10\)"),
        (lambda: IDSetSpec("digits", num_classes=5), "has 10 classes"),
        (lambda: AuxSetSpec(limit=0), r"^aux_set.limit: must be a positive integer or null, got 0$"),
        (lambda: OODSetSpec("id", "faces", "far"), r"OOD set 'id'.name: .*not one of \['id', 'near', 'far', 'all'\]"),
        (lambda: OODSetSpec("all", "faces", "far"), "OOD set 'all'"),
        (lambda: OODSetSpec("a/b", "faces", "far"), "without '/'"),
        (lambda: OODSetSpec("x", "digits", "far", classes=[9, 10]), r"x'.classes: 'digits' has 10 classes"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_set(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_ood_set_group_defaults_to_far() -> None:
    assert OODSetSpec("x", "gaussian").group == "far"
    assert OODSetSpec(name="x", source="faces", group="near").group == "near"


# ----------------------------------------------------------------------------------- configs and Lightning
def parse_data_config(path: Path) -> OODDataModule:
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(OODDataModule, "data", subclass_mode=True)
    config = parser.parse_args(["--data", str(path)])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config).data


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_instantiate(path: Path) -> None:
    dm = parse_data_config(path)
    assert isinstance(dm, OODDataModule) and dm.test_set_names[0] == "id"
    assert set(dm.test_set_groups.values()) <= {"near", "far"} and dm.num_classes > 0


def test_shipped_configs_sets() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"fashionmnist", "fashionmnist_openset", "digits_tiny"} <= names
    full = parse_data_config(CONFIGS[[p.stem for p in CONFIGS].index("fashionmnist")])
    assert full.num_classes == 10 and full.test_set_names[1:] == [
        "digits", "faces", "textures", "photos", "gaussian", "uniform",
    ]  # fmt: skip
    openset = parse_data_config(CONFIGS[[p.stem for p in CONFIGS].index("fashionmnist_openset")])
    assert openset.num_classes == 6 and openset.test_set_groups["fmnist_6to9"] == "near"
    dm = parse_data_config(CONFIGS[[p.stem for p in CONFIGS].index("digits_tiny")])
    dm.setup()
    sizes = [len(dl.dataset) for dl in dm.test_dataloader()]
    assert all(n % 4 for n in sizes[1:]) and set(dm.test_set_groups.values()) == {"near", "far"}


class _Linear(LightningModule):
    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, num_classes))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def test_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.log("n", float(len(batch[1])), reduce_fx="sum")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_and_test(tmp_path: Path) -> None:
    dm = tiny()
    model = _Linear(dm.num_classes, dm.channels * dm.image_size**2)
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    results = trainer.test(model, datamodule=dm, verbose=False)
    assert [r[f"n/dataloader_idx_{i}"] for i, r in enumerate(results)] == [25.0, 30.0, 23.0]
