"""Setup cost of an OpenOOD-layout benchmark at scale, and the fit / test passes against a plain loop.

Builds a synthetic OpenOOD data root in a temporary folder (``--files`` tiny PNGs in the ID training list, a
few thousand in each other list), deletes it afterwards, and measures:

1. ``setup``: ``OODDataModule.setup`` (every rank, every start: parse the lists, keep the paths; no image is
   opened), the once-per-node ``prepare_data`` check of every listed file (``check="open"``: PIL reads each
   header) on the first start and on a second start (remembered by the list's content hash), and, for scale,
   what decoding every file once would cost (``check="decode"``, what the ``imagefolder`` source does at build).
2. ``passes``: images/s of the detector fit pass (``OODMethod.fit_detectors``: forward + every default
   detector's statistics) and of the test pass (``trainer.test`` with every default detector, metrics and
   result files) against a plain loop running the same forward passes over the same DataLoader, on the first
   ``--pass-images`` images of the training list (decoding, resizing and collation included in both).

    nice python benchmarks/openood_setup.py --files 200000 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_ood.data import IDSetSpec, OODDataModule, OODSetSpec
from lightning_ood.data.datasets import SplitSource
from lightning_ood.data.imglist import check_imglist


def write_tree(root: Path, n_train: int, n_other: int, size: int, classes: int) -> dict[str, str]:
    """Tiny RGB PNGs in 1000-file folders, and the lists ``train``, ``val``, ``test``, ``ood``."""
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(64)]
    lists = {}
    for name, n in (("train", n_train), ("val", n_other), ("test", n_other), ("ood", n_other)):
        lines = []
        for i in range(n):
            rel = f"synthetic/{name}/{i // 1000:04d}/{i}.png"
            path = root / "images_largescale" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tiles[i % len(tiles)].save(path, compress_level=1)
            lines.append(f"{rel} {i % classes if name != 'ood' else -1}")
        lists[name] = f"benchmark_imglist/synthetic/{name}.txt"
        (root / lists[name]).parent.mkdir(parents=True, exist_ok=True)
        (root / lists[name]).write_text("\n".join(lines) + "\n")
    return lists


def datamodule(
    root: Path, lists: dict[str, str], size: int, classes: int, workers: int, batch: int
) -> OODDataModule:
    split = {p: SplitSource(options={"imglist": lists[p]}) for p in ("train", "val", "test")}
    ood = OODSetSpec("ood", "imglist", options={"imglist": lists["ood"], "images": "images_largescale"})
    id_set = IDSetSpec("imglist", num_classes=classes, options={"images": "images_largescale"}, **split)
    return OODDataModule(
        id_set, [ood], root=str(root), val_fraction=0.0, image_size=size, resize_size=size + size // 7,
        channels=3, batch_size=batch, num_workers=workers, mean=0.5, std=0.5,
    )  # fmt: skip


def timed(fn: object, *args: object, **kwargs: object) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - start, out


def plain_rate(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    """Images/s of a plain loop: the same DataLoader, the same forward pass, nothing else."""
    start, n = time.perf_counter(), 0
    with torch.inference_mode():
        for images, _ in loader:
            model.forward_outputs(images)
            n += len(images)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200_000, help="images in the ID training list")
    parser.add_argument("--other", type=int, default=2_000, help="images in each other list")
    parser.add_argument("--size", type=int, default=16, help="side of the stored PNGs and of the batches")
    parser.add_argument("--pass-images", type=int, default=10_000, help="images of the fit / test passes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats of each pass (best kept)")
    args = parser.parse_args()
    from lightning.pytorch import Trainer

    from lightning_ood.callbacks import OODEvaluation
    from lightning_ood.methods import Classifier

    tmp = Path(tempfile.mkdtemp(prefix="openood_setup_"))
    try:
        made, lists = timed(write_tree, tmp, args.files, args.other, args.size, 10)
        print(f"tree: {args.files} + 3 x {args.other} PNGs of {args.size} px written in {made:.1f} s")
        dm = datamodule(tmp, lists, args.size, 10, args.workers, 256)
        first, _ = timed(dm.prepare_data)
        second, _ = timed(dm.prepare_data)
        setup, _ = timed(dm.setup)
        decode, _ = timed(
            check_imglist, lists["train"], "images_largescale", str(tmp), "decode", tmp / "cache"
        )
        exists, _ = timed(
            check_imglist, lists["train"], "images_largescale", str(tmp), "exists", tmp / "cache"
        )
        n_lines = args.files + 3 * args.other
        table = [
            (f"setup: parse {n_lines} list lines (no file opened)", "every rank, every start", setup),
            ("prepare_data, check='open' (PIL reads each header), first start", "once per node", first),
            ("prepare_data, check='open', later starts (pass remembered)", "once per node", second),
            ("for scale: check='exists' (a stat per training file)", "not done by default", exists),
            ("for scale: check='decode' (every training file decoded)", "not done by default", decode),
        ]
        print("| step | when | seconds |\n|---|---|---:|")
        for step, when, seconds in table:
            print(f"| {step} | {when} | {seconds:.3f} |")
        torch.manual_seed(0)
        model = Classifier(backbone="test_resnet", num_classes=10, in_chans=3).eval()
        sub = OODDataModule(
            **{**dict(dm.hparams), "train_limit": args.pass_images, "test_limit": args.pass_images}
        )
        sub.setup()
        for det in model.detectors.values():
            det.configure(sub)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp / "run"),
                          callbacks=[OODEvaluation(plots=False, print_table=False)])  # fmt: skip
        n_fit, n_test = len(sub.fit_dataset), sum(len(sub.test_dataset(n)) for n in sub.test_set_names)
        rates: dict[str, list[float]] = {"fit": [], "fit_plain": [], "test": [], "test_plain": []}
        for _ in range(args.repeats):  # alternate, keep the best: the machine is shared
            rates["fit_plain"].append(plain_rate(model, sub.fit_dataloader()))
            for det in model.detectors.values():
                det.reset()  # fit again each repeat
            rates["fit"].append(n_fit / timed(model.fit_detectors, sub.fit_dataloader())[0])
            seconds = sum(len(ld.dataset) / plain_rate(model, ld) for ld in sub.test_dataloader())
            rates["test_plain"].append(n_test / seconds)
            rates["test"].append(n_test / timed(trainer.test, model, datamodule=sub, verbose=False)[0])
        best = {k: max(v) for k, v in rates.items()}
        print(
            "\n| pass | images | lightning-ood images/s | plain loop images/s | ratio |\n|---|---:|---:|---:|---:|"
        )
        for name, what, n in (
            ("fit", "every default detector's statistics", n_fit),
            ("test", "every default detector, metrics, files", n_test),
        ):
            ratio = best[name] / best[f"{name}_plain"]
            print(f"| {name} ({what}) | {n} | {best[name]:.0f} | {best[f'{name}_plain']:.0f} | {ratio:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
