"""lightning_ood.data: IDX / Fashion-MNIST reading, offline and torchvision sources, transforms, the unpadded
sampler (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (  # tests/data_helpers.py
    all_batches,
    tiny,
    write_fashion_mnist,
    write_idx,
)
from PIL import Image
from torch.utils.data import DistributedSampler

from lightning_ood.data import (
    IDSetSpec,
    OODDataModule,
    OODSetSpec,
    UnpaddedDistributedSampler,
    sources,
    sources_torchvision,
)
from lightning_ood.data import loaders as loaders_module
from lightning_ood.data.datasets import SOURCES
from lightning_ood.data.transforms import format_images


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


def _folder_with_unreadable_files(folder: Path) -> None:
    """3 readable images and 3 that are not: empty, not an image, a truncated PNG."""
    for i in range(3):
        write_png(folder / f"ok{i}.png", (10, 12))
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"not a jpeg")
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "cut.png").write_bytes((folder / "noise.png").read_bytes()[:1500])
    (folder / "noise.png").unlink()


def test_imagefolder_unreadable_files_fail_at_setup_listing_them(tmp_path: Path) -> None:
    _folder_with_unreadable_files(tmp_path)
    dm = tiny(ood_sets=[OODSetSpec("x", "imagefolder", "far", options={"path": str(tmp_path)})])
    with pytest.raises(OSError) as err:
        dm.setup()  # not midway through an evaluation
    message = str(err.value)
    assert f"image folder {tmp_path}: 3 of 6 image files cannot be read" in message
    for name in ("empty.png", "text.jpg", "sub/cut.png"):
        assert str(tmp_path / name) in message
    assert "ok0.png" not in message and "skip_unreadable: true" in message


def test_imagefolder_unreadable_paths_are_listed_up_to_a_few(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"bad{i}.png").write_bytes(b"")
    with pytest.raises(OSError, match=r"(?s)8 of 8 image files cannot be read:.*bad4\.png.*\(and 3 more\)"):
        sources_torchvision.imagefolder(str(tmp_path))
    write_png(tmp_path / "lab" / "a" / "0.png", (4, 4))
    (tmp_path / "lab" / "b").mkdir()
    (tmp_path / "lab" / "b" / "0.png").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"left out 1 of 2 .*classes left without images: \['b'\]"):
        raw = sources_torchvision.imagefolder(str(tmp_path / "lab"), skip_unreadable=True)
    assert raw.class_names == ("a", "b") and raw.labels.tolist() == [0]  # labels keep their meaning


def test_imagefolder_skip_unreadable_drops_them_with_a_warning(tmp_path: Path) -> None:
    _folder_with_unreadable_files(tmp_path / "flat")
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            write_png(tmp_path / "lab" / cls / f"{i}.png", (12, 9))
    (tmp_path / "lab" / "cat" / "bad.png").write_bytes(b"")
    options = {"path": str(tmp_path / "flat"), "skip_unreadable": True}
    dm = OODDataModule(
        IDSetSpec("imagefolder", num_classes=2, options={"path": "lab", "skip_unreadable": True}),
        [OODSetSpec("x", "imagefolder", "far", options=options)],
        root=str(tmp_path),
        image_size=8,
        val_fraction=0.0,
        train_transforms=[],
        channels=3,
    )
    with pytest.warns(UserWarning) as record:
        dm.setup()
    messages = [str(w.message) for w in record]
    assert any("flat: left out 3 of 6 image files that cannot be read" in m for m in messages)
    assert any("lab: left out 1 of 6" in m and "bad.png" in m for m in messages)
    assert len(dm.test_dataloader()[1].dataset) == 3  # the set's n_ood: the readable images only
    images, targets = all_batches(dm.test_dataloader()[1])  # and every one of them is read
    assert images.shape == (3, 3, 8, 8) and (targets == -1).all()
    id_targets = torch.cat([all_batches(dl)[1] for dl in (dm.fit_dataloader(), dm.test_dataloader()[0])])
    assert dm.class_names == ["cat", "dog"] and sorted(id_targets.tolist()) == [0, 0, 1, 1, 1]  # 80/20 split


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
        monkeypatch.setattr(loaders_module, "distributed_world", lambda rank=rank: (rank, 3))
        loaders = [dm.fit_dataloader(), dm.val_dataloader(), *dm.test_dataloader()]
        assert all(isinstance(dl.sampler, UnpaddedDistributedSampler) for dl in loaders)
        shards.append([all_batches(dl) for dl in loaders])
    for k, (images, _) in enumerate(full):
        merged = torch.cat([shards[r][k][0] for r in range(3)])
        assert len(merged) == len(images)  # nothing duplicated or dropped
        assert sorted(map(tuple, merged.flatten(1).tolist())) == sorted(
            map(tuple, images.flatten(1).tolist())
        )


def _ddp_data(folder: str) -> OODDataModule:
    """``tiny()`` and an image folder of 7 files whose row 3 (rank 1's share of 2 ranks) cannot be read."""
    options = {"path": f"{folder}/images", "skip_unreadable": True}
    return tiny(ood_sets=[*tiny().ood_sets, OODSetSpec("folder", "imagefolder", "far", options=options)])


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not reuse the parent's pool
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    checked: list[Path] = []  # the files this rank decodes to check the folder (setup without prepare_data)
    reason = sources_torchvision.unreadable_reason
    sources_torchvision.unreadable_reason = lambda path: checked.append(Path(path)) or reason(path)  # forked
    try:
        dm = _ddp_data(folder)
        dm.setup()
        shards = [all_batches(dl)[0] for dl in dm.test_dataloader()]
        torch.save((shards, [p.name for p in checked]), f"{folder}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_real_ddp_scores_every_test_image_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(7):
        write_png(tmp_path / "images" / f"a{i}.png", (6, 5))
    (tmp_path / "images" / "a3.png").write_bytes(b"")
    # fork: the children inherit the imports, which would take most of this test's time under spawn
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    decoded: list[object] = []
    monkeypatch.setattr(sources_torchvision, "unreadable_reason", lambda path: decoded.append(path))
    dm = _ddp_data(str(tmp_path))
    with pytest.warns(UserWarning, match=r"(?s)left out 1 of 7 .*a3\.png"):
        dm.setup()
    assert decoded == []  # the ranks' result, remembered by rank 0
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [names for _, names in ranks] == [[f"a{i}.png" for i in range(r, 7, 2)] for r in range(2)]
    assert len(dm.test_dataloader()) == 4 and len(dm.test_dataloader()[3].dataset) == 6
    for k, loader in enumerate(dm.test_dataloader()):
        images, _ = all_batches(loader)
        assert all(torch.equal(ranks[r][0][k], images[r::2]) for r in range(2))  # rank r: r, r + 2, ...
