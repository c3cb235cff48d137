"""A synthetic data root in OpenOOD v1.5's layout, built from a benchmark config's own image lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("cifar10", "cifar100", "imagenet200", "imagenet1k")


def config_path(benchmark: str) -> Path:
    return ROOT / "configs" / "benchmarks" / f"openood_v15_{benchmark}.yaml"


def config_lists(benchmark: str) -> dict[str, tuple[str, str]]:
    """``{set key: (image list, image folder)}`` of every set of a benchmark config: ``id/train``, ``id/val``,
    ``id/test``, ``ood_val`` and ``<group>/<name>`` of each OOD set."""
    data = yaml.safe_load(config_path(benchmark).read_text())["data"]["init_args"]
    id_set = data["id_set"]
    lists = {}
    for part in ("train", "val", "test"):
        options = {**id_set.get("options", {}), **id_set[part]["options"]}
        lists[f"id/{part}"] = (options["imglist"], options["images"])
    for spec in data["ood_sets"]:
        lists[f"{spec['group']}/{spec['name']}"] = (spec["options"]["imglist"], spec["options"]["images"])
    val = data["ood_val_set"]["options"]
    lists["ood_val"] = (val["imglist"], val["images"])
    return lists


def write_png(
    path: Path, rng: np.random.Generator, mode: str = "RGB", size: tuple[int, int] = (11, 9)
) -> None:
    """A random image file of ``size`` (width, height) in PIL ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path)


def write_tree(root: Path, benchmark: str, per_set: int, num_classes: int, seed: int = 0) -> dict[str, int]:
    """Every list of the benchmark config under ``root`` with ``per_set`` lines each, the ID train list
    ``max(per_set, num_classes)`` (every class once); ID labels cycle through the classes, OOD labels are -1.
    Each set's lines name ``per_set`` tiny PNGs of its own (cycled), grey, RGB and RGBA in turn. Returns
    ``{set key: number of lines}``."""
    rng = np.random.default_rng(seed)
    sizes = {}
    for key, (imglist, images) in config_lists(benchmark).items():
        lines = []
        folder = key.replace("/", "_")
        n = max(per_set, num_classes) if key == "id/train" else per_set
        for i in range(per_set):
            write_png(root / images / benchmark / folder / f"{i}.png", rng, ("RGB", "L", "RGBA")[i % 3])
        for i in range(n):
            label = i % num_classes if key.startswith("id/") else -1
            lines.append(f"{benchmark}/{folder}/{i % per_set}.png {label}")
        path = root / imglist
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        sizes[key] = n
    return sizes
