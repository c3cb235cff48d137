"""OpenOOD v1.5 benchmarks on synthetic trees in OpenOOD's layout: each benchmark config through the CLI, the set
lists against OpenOOD's, OpenOOD's networks key for key, their preprocessing, bad image lists, per-split ID sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from cli_helpers import FAST, csv_logger, eval_callback
from openood_helpers import BENCHMARKS, config_lists, config_path, write_png, write_tree
from PIL import Image
from torchvision import transforms as T

import lightning_ood.nets  # noqa: F401  (registers OpenOOD's networks with timm)
from lightning_ood.cli import evaluate
from lightning_ood.data import IDSetSpec, OODDataModule, OODSetSpec
from lightning_ood.data.datasets import SplitSource
from lightning_ood.data.imglist import check_imglist, parse_imglist
from lightning_ood.nets.timm_net import create_timm_model

# OpenOOD v1.5's sets, transcribed from DATA_INFO in openood/evaluation_api/datasets.py (Jingkang50/OpenOOD):
# ID train / val / test lists, near and far OOD {name: list}, the OOD validation list; images_classic unless noted.
LISTS = "benchmark_imglist/{}/{}.txt"
OPENOOD = {
    "cifar10": ("cifar10", ["cifar100", "tin"], ["mnist", "svhn", "texture", "places365"], "val_tin"),
    "cifar100": ("cifar100", ["cifar10", "tin"], ["mnist", "svhn", "texture", "places365"], "val_tin"),
    "imagenet200": (
        "imagenet200",
        ["ssb_hard", "ninco"],
        ["inaturalist", "textures", "openimage_o"],
        "val_openimage_o",
    ),
    "imagenet1k": (
        "imagenet",
        ["ssb_hard", "ninco"],
        ["inaturalist", "textures", "openimage_o"],
        "val_openimage_o",
    ),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet200": 200, "imagenet1k": 1000}
#: the network each CLI run evaluates: the config's own for CIFAR and ImageNet-200; ImageNet-1K's ResNet-50 is
#: swapped for ResNet18_224x224 (same timm ResNet loader, a quarter of the time to build)
NETS = {"cifar10": "openood_resnet18_32x32", "cifar100": "openood_resnet18_32x32"}


def expected_lists(benchmark: str) -> dict[str, tuple[str, str]]:
    folder, near, far, val = OPENOOD[benchmark]
    large = "images_classic" if folder.startswith("cifar") else "images_largescale"
    lists = {f"id/{p}": (LISTS.format(folder, f"{p}_{folder}"), large) for p in ("train", "val", "test")}
    for group, names in (("near", near), ("far", far)):
        for name in names:
            images = "images_classic" if name == "textures" else large
            lists[f"{group}/{name}"] = (LISTS.format(folder, f"test_{name}"), images)
    lists["ood_val"] = (LISTS.format(folder, val), large)
    return lists


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_config_sets_are_openood_v15s(benchmark: str) -> None:
    assert config_lists(benchmark) == expected_lists(benchmark)


def openood_keys() -> list[str]:
    """OpenOOD's ResNet18_32x32 state-dict keys, from its architecture (conv1/bn1, 4 stages of 2 basic blocks,
    a shortcut conv+bn in the first block of stages 2-4, fc)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *(f"bn1.{k}" for k in bn)]
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{k}" for k in bn), f"{p}.conv2.weight"]
            keys += [f"{p}.bn2.{k}" for k in bn]
            if stage > 1 and block == 0:
                keys += [f"{p}.shortcut.0.weight", *(f"{p}.shortcut.1.{k}" for k in bn)]
    return [*keys, "fc.weight", "fc.bias"]


def random_weights(name: str, num_classes: int, path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes).eval()
    for m in model.modules():  # non-trivial batch-norm statistics, so loading them is seen
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return path, model


def test_resnet18_32x32_is_openoods_key_for_key(tmp_path: Path) -> None:
    path, model = random_weights("openood_resnet18_32x32", 10, tmp_path / "best.ckpt")
    assert list(torch.load(path)) == openood_keys()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in torch.load(path).items()}}  # DataParallel save
    torch.save(wrapped, tmp_path / "wrapped.ckpt")
    loaded = create_timm_model(
        "openood_resnet18_32x32", num_classes=10, in_chans=3, weights_path=str(tmp_path / "wrapped.ckpt")
    )
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a head for another class count is not replaced
        create_timm_model("openood_resnet18_32x32", num_classes=100, in_chans=3, weights_path=str(path))


def test_resnet18_224x224_loads_torchvisions_resnet18(tmp_path: Path) -> None:
    """OpenOOD's ResNet18_224x224 is torchvision's ResNet-18: its weights load key for key, same logits."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=200).eval()
    torch.save(reference.state_dict(), tmp_path / "best.ckpt")
    net = create_timm_model(
        "openood_resnet18_224x224", num_classes=200, in_chans=3, weights_path=str(tmp_path / "best.ckpt")
    )
    assert list(net.state_dict()) == list(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net.eval()(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {
        b: random_weights(NETS.get(b, "openood_resnet18_224x224"), k, root / f"{b}.ckpt")[0]
        for b, k in NUM_CLASSES.items()
    }


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_benchmark_config_evaluates_through_the_cli(
    benchmark: str, weights: dict[str, Path], tmp_path: Path
) -> None:
    """evaluate.py --config configs/benchmarks/<b>.yaml --model.init_args.weights_path=<ckpt>, the data root
    pointed at a synthetic tree; tiny images (the set lists are the config's)."""
    data = tmp_path / "data"
    sizes = write_tree(data, benchmark, per_set=4, num_classes=NUM_CLASSES[benchmark])
    size = ["--data.init_args.image_size=8", "--data.init_args.resize_size=10"]
    if benchmark == "cifar10":  # every default detector, and the search on the OOD validation set
        detectors = ["--detector_search.grid={knn: {k: [1, 2]}}"]
    else:  # detectors without class means: a few training images suffice (the list still names every class)
        detectors = [
            "--detector_search.grid=null",
            "--data.init_args.train_limit=4",
            "--model.init_args.detectors=[{class_path: lightning_ood.detectors.MSP}, "
            "{class_path: lightning_ood.detectors.KNN}]",
        ]
    net = ["--model.init_args.backbone=openood_resnet18_224x224"] if benchmark == "imagenet1k" else []
    data_args = [f"--data.init_args.root={data}", "--data.init_args.num_workers=0"]
    weights_arg = f"--model.init_args.weights_path={weights[benchmark]}"
    config = ["--config", str(config_path(benchmark))]
    cli = evaluate([*config, *FAST, *csv_logger(tmp_path), *size, *detectors, *net, *data_args, weights_arg])
    dm = cli.datamodule
    ood = {k.split("/")[1]: k.split("/")[0] for k in sizes if k.startswith(("near/", "far/"))}
    assert dm.test_set_names == ["id", *ood] and dm.test_set_groups == ood
    n_train = sizes["id/train"] if benchmark == "cifar10" else 4
    assert len(dm.fit_dataset) == n_train and len(dm.test_dataset("id")) == sizes["id/test"]
    rows = eval_callback(cli).rows
    assert {r["set"] for r in rows} == {*ood, "near", "far", "all"}
    assert all(r["dataset"] == f"openood_v15_{benchmark}" for r in rows)
    if benchmark == "cifar10":  # the search scored ID val against val_tin, the OOD validation set
        record = json.loads((eval_callback(cli).output_path / "detector_search.json").read_text())
        assert record["n_ood"] == sizes["ood_val"] and record["n_id"] == sizes["id/val"]


@pytest.mark.parametrize(("resize", "size"), [(32, 32), (256, 224)])
def test_preprocessing_equals_openoods_torchvision_pipeline(tmp_path: Path, resize: int, size: int) -> None:
    rng = np.random.default_rng(1)
    shapes = [("RGB", (40, 30)), ("L", (28, 28)), ("RGBA", (300, 260)), ("RGB", (32, 32))]
    for i, (mode, shape) in enumerate(shapes):
        write_png(tmp_path / "images" / f"{i}.png", rng, mode, shape)
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i % 2}\n" for i in range(len(shapes))))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    split = SplitSource(options={"imglist": "list.txt"})
    dm = OODDataModule(
        IDSetSpec("imglist", num_classes=2, options={"images": "images"}, train=split, test=split),
        root=str(tmp_path),
        val_fraction=0.0,
        image_size=size,
        resize_size=resize,
        channels=3,
        mean=mean,
        std=std,
    )
    dm.setup()
    images, targets = next(iter(dm.test_dataloader()[0]))
    openood = T.Compose([
        T.Lambda(lambda im: im.convert("RGB")),
        T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip
    expected = torch.stack(
        [openood(Image.open(tmp_path / "images" / f"{i}.png")) for i in range(len(shapes))]
    )
    assert torch.equal(images, expected) and targets.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.png 0\n\nb.png 1\n", r"list.txt, line 2: blank line"),
        ("a.png 0\nb.png cat\n", r"list.txt, line 2: label 'cat' is not a class index"),
        ("a.png -5\n", r"list.txt, line 1: label '-5'"),
        ("/abs/a.png 0\n", r"list.txt, line 1: '/abs/a.png' must be relative"),
    ],
)
def test_bad_list_lines_fail_naming_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "list.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        parse_imglist(tmp_path / "list.txt")


def test_missing_files_fail_once_checked_and_a_pass_is_remembered(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_png(tmp_path / "images" / "a.png", rng)
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    cache = tmp_path / "cache"
    (tmp_path / "list.txt").write_text("a.png 0\nmissing.png 1\nempty.png 1\n")
    with pytest.raises(
        OSError,
        match=r"(?s)2 of 3 files fail check=.open.:.*line 2: .*missing.png: no such file.*line 3: .*empty.png",
    ):
        check_imglist("list.txt", "images", str(tmp_path), cache_dir=cache)
    (tmp_path / "list.txt").write_text("a.png 0\n")
    assert check_imglist("list.txt", "images", str(tmp_path), cache_dir=cache)  # checked: every file opens
    assert not check_imglist("list.txt", "images", str(tmp_path), cache_dir=cache)  # remembered by content
    with pytest.raises(FileNotFoundError, match=r"nowhere.txt does not exist\. Get OpenOOD v1\.5's data"):
        check_imglist("nowhere.txt", "images", str(tmp_path), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"image folder .*no_images does not exist"):
        check_imglist("list.txt", "no_images", str(tmp_path), cache_dir=cache)


def digits(**id_kwargs: object) -> OODDataModule:
    return OODDataModule(
        IDSetSpec("digits", **id_kwargs), [OODSetSpec("faces", "faces", limit=10)], val_fraction=0.0, seed=3
    )


def test_per_split_id_sources() -> None:
    default, split = digits(), digits(train=SplitSource(split="train"), test=SplitSource(split="test"))
    default.setup(), split.setup()
    for a, b in (
        (default.fit_dataset, split.fit_dataset),
        (default.test_dataset("id"), split.test_dataset("id")),
    ):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    with pytest.raises(ValueError, match=r"id_set\.test is missing: .*id_set\.train given"):
        IDSetSpec("digits", train=SplitSource(split="train"))
    with pytest.raises(ValueError, match=r"val_fraction=0\.1, but id_set\.val gives the validation images"):
        OODDataModule(IDSetSpec("digits", train=SplitSource(), val=SplitSource(), test=SplitSource()))
    with pytest.raises(ValueError, match=r"id_set\.val\.split is required: 'mnist' has splits"):
        IDSetSpec("mnist", train=SplitSource(), val=SplitSource(), test=SplitSource())


def test_an_ood_label_in_an_id_list_fails_naming_the_split(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.random.default_rng(0))
    (tmp_path / "train.txt").write_text("a.png 0\na.png 1\n")
    (tmp_path / "test.txt").write_text("a.png 0\na.png -1\n")
    spec = IDSetSpec(
        "imglist", num_classes=2, options={"images": "images"},
        train=SplitSource(options={"imglist": "train.txt"}), test=SplitSource(options={"imglist": "test.txt"}),
    )  # fmt: skip
    dm = OODDataModule(spec, root=str(tmp_path), val_fraction=0.0, image_size=8, channels=3)
    with pytest.raises(
        ValueError, match=r"id_set\.test: 1 images have labels outside the ID classes \[0, 2\)"
    ):
        dm.setup()


def test_fit_fingerprint_follows_the_training_lists_content(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 1\n")
    split = {p: SplitSource(options={"imglist": f"{p}.txt"}) for p in ("train", "test")}
    spec = IDSetSpec("imglist", num_classes=2, options={"images": "images"}, **split)
    dm = OODDataModule(spec, root=str(tmp_path), val_fraction=0.0, image_size=8, channels=3)
    before = dm.fit_fingerprint()
    (tmp_path / "train.txt").write_text("a.png 0\nc.png 1\n")  # same path, other images
    assert dm.fit_fingerprint() != before
    assert "id_train_list_sha256" not in digits().fit_fingerprint()  # other sources: as before
