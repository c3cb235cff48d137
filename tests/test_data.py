"""lightning_ood.data: sources, specs, transforms, the unpadded sampler and the OODDataModule (no network)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser
from PIL import Image
from torch.utils.data import DistributedSampler

from lightning_ood.data import (
    AuxSetSpec,
    IDSetSpec,
    OODDataModule,
    OODSetSpec,
    UnpaddedDistributedSampler,
    sources,
)
from lightning_ood.data import datamodule as datamodule_module
from lightning_ood.data.datasets import SOURCES, limit_indices
from lightning_ood.data.transforms import format_images

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "data").glob("*.yaml"))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> None:
    """Fake Fashion-MNIST: image i is the constant i (so images identify themselves), label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)


@pytest.fixture
def no_system_fmnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide the Fashion-MNIST of the machine; returns the fake system folder (empty)."""
    nowhere = tmp_path / "system-fashion-mnist"
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIRS", (nowhere,))
    return nowhere


@pytest.fixture
def fmnist_root(tmp_path: Path, no_system_fmnist: Path) -> str:
    write_fashion_mnist(tmp_path / "root" / "fashion-mnist")
    return str(tmp_path / "root")


def tiny(**kwargs: object) -> OODDataModule:
    """A digits DataModule small enough for unit tests."""
    defaults: dict = dict(
        id_set=IDSetSpec("digits"),
        ood_sets=[
            OODSetSpec("faces", "faces", "near", limit=30),
            OODSetSpec("noise", "gaussian", "far", options={"n": 23, "size": 8, "channels": 1}),
        ],
        train_limit=60,
        val_limit=20,
        test_limit=25,
        batch_size=16,
    )
    return OODDataModule(**{**defaults, **kwargs})  # type: ignore[arg-type]


def all_batches(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(targets)


# ----------------------------------------------------------------------------------- IDX and Fashion-MNIST
@pytest.mark.parametrize("name", ["x-idx3-ubyte.gz", "x-idx3-ubyte"])
def test_read_idx_round_trip(tmp_path: Path, name: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(sources.read_idx(tmp_path / name), array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        sources.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="header says shape"):
        sources.read_idx(tmp_path / "short")


@pytest.mark.parametrize("sub", ["fashion-mnist", "FashionMNIST/raw", "."])
def test_fashion_mnist_root_search(tmp_path: Path, no_system_fmnist: Path, sub: str) -> None:
    write_fashion_mnist(tmp_path / sub, gz=sub != ".")
    raw = sources.fashion_mnist("test", root=str(tmp_path))
    assert raw.images.shape == (20, 28, 28, 1) and raw.images.dtype == np.uint8
    np.testing.assert_array_equal(raw.labels, np.arange(20) % 10)
    assert raw.class_names[0] == "T-shirt/top" and len(raw.class_names) == 10


def test_fashion_mnist_falls_back_to_system_folder(tmp_path: Path, no_system_fmnist: Path) -> None:
    write_fashion_mnist(no_system_fmnist, n_test=7)
    assert len(sources.fashion_mnist("test", root=str(tmp_path / "empty"))) == 7


def test_missing_fashion_mnist_names_every_place(tmp_path: Path, no_system_fmnist: Path) -> None:
    dm = OODDataModule(IDSetSpec("fashionmnist"), root=str(tmp_path))  # no I/O yet
    dm.prepare_data()  # nothing to do without download
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    for place in (tmp_path / "fashion-mnist", tmp_path / "FashionMNIST" / "raw", tmp_path, no_system_fmnist):
        assert f"- {place}\n" in message + "\n"
    assert "apt-get install dataset-fashion-mnist" in message and "download: true" in message


def test_open_set_split_relabels_and_holds_out(fmnist_root: str) -> None:
    dm = OODDataModule(
        IDSetSpec("fashionmnist", classes=[5, 2, 0]),
        [OODSetSpec("held_out", "fashionmnist", "near", classes=[6, 7, 8, 9], split="test")],
        root=fmnist_root,
        val_fraction=0.25,
        train_transforms=[],
    )
    assert dm.num_classes == 3 and dm.dataset_name == "fashionmnist[5,2,0]"
    dm.setup()
    assert dm.class_names == ["Sandal", "Pullover", "T-shirt/top"]
    images, targets = all_batches(dm.fit_dataloader())
    original = torch.round((images[:, 0, 0, 0] * 0.5 + 0.5) * 255).long()  # fake image i is the constant i
    np.testing.assert_array_equal(targets.numpy(), [[5, 2, 0].index(int(i) % 10) for i in original])
    assert len(dm.val_dataloader().dataset) == 3 and len(targets) == 9  # 12 train images of classes 0, 2, 5
    ood_images, ood_targets = all_batches(dm.test_dataloader()[1])
    assert (ood_targets == -1).all() and len(ood_targets) == 8  # test images 6..9 and 16..19
    values = torch.round((ood_images[:, 0, 0, 0] * 0.5 + 0.5) * 255).long()
    assert sorted(values.tolist()) == [6, 7, 8, 9, 16, 17, 18, 19]


# ----------------------------------------------------------------------------------- offline and torchvision
def test_offline_sources_are_deterministic_uint8() -> None:
    for name in ("digits", "faces", "textures", "photos", "aux_photos", "gaussian", "uniform"):
        options = {"n": 12} if "n" in SOURCES[name].build.__code__.co_varnames else {}
        a, b = SOURCES[name].build(**options), SOURCES[name].build(**options)
        assert a.images.dtype == np.uint8 and a.images.ndim == 4, name
        np.testing.assert_array_equal(a.images, b.images)
        assert SOURCES[name].num_classes == len(a.class_names), name
    assert len(SOURCES["digits"].build()) == 1797 and len(SOURCES["faces"].build()) == 200
    assert not np.array_equal(sources.photos(n=5).images, sources.photos(n=5, seed=1).images)


def test_aux_images_are_not_test_images() -> None:
    assert not set(sources.AUX_IMAGES) & set(sources.PHOTO_IMAGES + sources.TEXTURE_IMAGES)
    assert "stereo_motorcycle" not in sources.AUX_IMAGES


def test_torchvision_source_reads_local_files_and_explains_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw.*download: true"):
        SOURCES["mnist"].build(split="test", root=str(tmp_path))
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), 7))
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", np.arange(n))
    raw = SOURCES["mnist"].build(split="test", root=str(tmp_path))
    assert raw.images.shape == (4, 28, 28, 1) and list(raw.labels) == [0, 1, 2, 3]


def write_png(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128 if mode == "L" else (255, 0, 0)).save(path)


def test_imagefolder_labelled_and_flat(tmp_path: Path) -> None:
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            write_png(tmp_path / "lab" / cls / f"{i}.png", (12, 9))
    write_png(tmp_path / "flat" / "a.png", (40, 20), "L")
    write_png(tmp_path / "flat" / "sub" / "b.jpg", (20, 40))
    dm = OODDataModule(
        IDSetSpec("imagefolder", num_classes=2, options={"path": "lab"}),
        [OODSetSpec("mine", "imagefolder", "far", options={"path": str(tmp_path / "flat")})],
        root=str(tmp_path),
        image_size=16,
        channels=3,
        val_fraction=0.0,
    )
    assert dm.dataset_name == "imagefolder(lab)"
    dm.setup()
    assert dm.class_names == ["cat", "dog"] and dm.val_dataloader() == []
    images, targets = all_batches(dm.test_dataloader()[1])
    assert images.shape == (2, 3, 16, 16) and (targets == -1).all()


def test_imagefolder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"id_set.num_classes is required .*imagefolder"):
        IDSetSpec("imagefolder", options={"path": str(tmp_path)})
    for folder, match in ((tmp_path / "missing", "does not exist"), (tmp_path, "holds no images")):
        dm = tiny(ood_sets=[OODSetSpec("x", "imagefolder", "far", options={"path": str(folder)})])
        with pytest.raises(FileNotFoundError, match=f"{folder}.*{match}"):
            dm.setup()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dm = tiny(ood_sets=[OODSetSpec("x", "imagefolder", "far", options={"path": str(tmp_path)})])
    dm.setup()
    with pytest.raises(OSError, match=r"cannot read image .*broken\.png"):
        next(iter(dm.test_dataloader()[1]))


# ----------------------------------------------------------------------------------- transforms and sampler
def test_format_images_channels_and_size() -> None:
    rgba = torch.randint(0, 256, (2, 4, 30, 60), dtype=torch.uint8)
    grey = format_images(rgba, 1, 16)
    assert grey.shape == (2, 1, 16, 16) and grey.dtype == torch.uint8
    rgb = format_images(grey, 3, 8)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    # aspect ratio is kept: a wide image is resized by its short side and centre-cropped
    wide = torch.zeros(1, 1, 10, 30, dtype=torch.uint8)
    wide[..., :10] = 255
    assert format_images(wide, 1, 10).max() == 0


def test_batches_are_converted_and_normalised() -> None:
    dm = tiny(
        ood_sets=[OODSetSpec("photos", "photos", "far", options={"n": 9, "crop_size": 40})],
        image_size=12,
        channels=3,
        mean=[0.1, 0.2, 0.3],
        std=0.25,
    )
    dm.setup()
    assert dm.mean == (0.1, 0.2, 0.3) and dm.std == (0.25, 0.25, 0.25)
    for loader in (dm.train_dataloader(), dm.fit_dataloader(), *dm.test_dataloader()):
        images, targets = next(iter(loader))
        assert (
            images.shape[1:] == (3, 12, 12) and images.dtype == torch.float32 and targets.dtype == torch.long
        )
        pixels = images * torch.tensor(dm.std).view(1, 3, 1, 1) + torch.tensor(dm.mean).view(1, 3, 1, 1)
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    _, targets = all_batches(dm.test_dataloader()[0])
    assert targets.min() >= 0 and targets.max() < 10
    assert (all_batches(dm.test_dataloader()[1])[1] == -1).all()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [1, 7, 10, 11])
def test_unpadded_sampler_partitions_exactly(world: int, n: int) -> None:
    shards = [list(UnpaddedDistributedSampler(range(n), num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    lengths = [len(UnpaddedDistributedSampler(range(n), num_replicas=world, rank=r)) for r in range(world)]
    assert lengths == [len(s) for s in shards]
    assert isinstance(
        UnpaddedDistributedSampler(range(n), world, 0), DistributedSampler
    )  # Lightning keeps it


def test_eval_loaders_shard_without_padding_under_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = tiny()
    dm.setup()
    full = [
        all_batches(loader) for loader in (dm.fit_dataloader(), dm.val_dataloader(), *dm.test_dataloader())
    ]
    assert [len(t) for _, t in full[2:]] == [25, 30, 23]
    shards = []
    for rank in range(3):
        monkeypatch.setattr(datamodule_module, "distributed_world", lambda rank=rank: (rank, 3))
        loaders = [dm.fit_dataloader(), dm.val_dataloader(), *dm.test_dataloader()]
        assert all(isinstance(dl.sampler, UnpaddedDistributedSampler) for dl in loaders)
        shards.append([all_batches(dl) for dl in loaders])
    for k, (images, _) in enumerate(full):
        merged = torch.cat([shards[r][k][0] for r in range(3)])
        assert len(merged) == len(images)  # nothing duplicated or dropped
        assert sorted(map(tuple, merged.flatten(1).tolist())) == sorted(
            map(tuple, images.flatten(1).tolist())
        )


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not reuse the parent's pool
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        dm = tiny()
        dm.setup()
        shards = [all_batches(dl)[0] for dl in dm.test_dataloader()]
        torch.save(shards, f"{folder}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_real_ddp_scores_every_test_image_once(tmp_path: Path) -> None:
    # fork: the children inherit the imports, which would take most of this test's time under spawn
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    dm = tiny()
    dm.setup()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for k, loader in enumerate(dm.test_dataloader()):
        images, _ = all_batches(loader)
        assert all(torch.equal(ranks[r][k], images[r::2]) for r in range(2))  # rank r: r, r + 2, ...


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
        (lambda: OODSetSpec("x", "faces", "middle"), "OOD set 'x': group must be 'near' or 'far'"),
        (lambda: OODSetSpec("x", "faces", "far", options={"nn": 3}), r"options: 'faces' has no option 'nn'"),
        (lambda: OODSetSpec("x", "gaussian", "far", options={"nn": 3}), r"it takes \['n', 'size'"),
        (lambda: OODSetSpec("x", "fashionmnist", "far", split="all"), r"x'.split: .*\['train', 'test'\]"),
        (lambda: IDSetSpec("gaussian"), "unlabelled"),
        (lambda: IDSetSpec("digits", classes=[3, 3]), "distinct"),
        (lambda: IDSetSpec("digits", classes=[10]), r"\[0, 10\)"),
        (lambda: IDSetSpec("digits", num_classes=5), "has 10 classes"),
        (lambda: AuxSetSpec(limit=0), "aux_set.limit"),
        (lambda: OODSetSpec("id", "faces", "far"), r"OOD set 'id': .*not one of \('id', 'near', 'far', 'all'\)"),
        (lambda: OODSetSpec("all", "faces", "far"), "OOD set 'all'"),
        (lambda: OODSetSpec("a/b", "faces", "far"), "without '/'"),
        (lambda: OODSetSpec("x", "digits", "far", classes=[9, 10]), r"x'.classes: 'digits' has 10 classes"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_set(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


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
