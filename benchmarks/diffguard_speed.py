"""DiffGuard throughput: whole batches through inversion and regeneration vs a batch-size-1 loop like the
reference code, on the same models, steps and images; counts the diffusion network's evaluations per image.

    python benchmarks/diffguard_speed.py --images 64 --steps 10
    python benchmarks/diffguard_speed.py --classifier <ckpt> --diffusion <ckpt or pipeline folder>

Without checkpoints it builds a random classifier (timm ``resnet10t``, 10 classes) and a random DiffusionModel
with the architecture of ``configs/model/diffusion_unet_small.yaml`` on 28 px grey images: speed does not depend
on the weights. Prints a Markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lightning_ood.detectors import Energy
from lightning_ood.methods import Classifier, DiffGuard, DiffusionModel


def _save(module: torch.nn.Module, path: Path) -> str:
    for key in ("optimizer", "scheduler"):
        module.hparams.pop(key, None)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return str(path)


def random_models(folder: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    classifier = Classifier(backbone="resnet10t", num_classes=10, in_chans=1)
    diffusion = DiffusionModel(num_classes=10, in_chans=1, sample_size=28, block_out_channels=(16, 32, 64))
    return _save(classifier, folder / "classifier.ckpt"), _save(diffusion, folder / "diffusion.ckpt")


class CountingDenoiser:
    """Counts images passed through the diffusion network (one image in a batch of B counts once)."""

    def __init__(self, method: DiffGuard) -> None:
        self.count = 0
        inner = method.diffusion.predict_noise

        def counted(x, t, labels):
            self.count += len(x)
            return inner(x, t, labels)

        method.diffusion.predict_noise = counted


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--classifier", help="a lightning-ood classifier checkpoint (default: random resnet10t)"
    )
    parser.add_argument(
        "--diffusion", help="a DiffusionModel checkpoint or pipeline folder (default: random)"
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", default="classifier_free", choices=["classifier_free", "classifier"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        classifier, diffusion = (
            (args.classifier, args.diffusion) if args.classifier else random_models(Path(tmp))
        )
        method = DiffGuard(
            classifier, diffusion, num_classes=10, in_chans=1, steps=args.steps, guidance=args.guidance,
            input_mean=[0.5], input_std=[0.5], detectors=[Energy()], combine_with=None,
        ).eval()  # fmt: skip
    counter = CountingDenoiser(method)
    images = torch.rand(args.images, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def scores(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return method.native_scores(method.forward_outputs(x), x)

    with torch.inference_mode():
        scores(images[:2])  # warm-up
        counter.count = 0
        batched_s = timed(lambda: scores(images))
        evals = counter.count / args.images
        loop_s = timed(lambda: [scores(images[i : i + 1]) for i in range(args.images)])
    print("| mode | images | DDIM steps | UNet evaluations / image | seconds | images / s |")
    print("|---|---|---|---|---|---|")
    print(f"| batched ({args.images}) | {args.images} | {args.steps} | {evals:.0f} | {batched_s:.1f} | "
          f"{args.images / batched_s:.2f} |")  # fmt: skip
    print(f"| batch size 1 loop | {args.images} | {args.steps} | {evals:.0f} | {loop_s:.1f} | "
          f"{args.images / loop_s:.2f} |")  # fmt: skip
    print(
        f"\nspeed-up: {loop_s / batched_s:.1f}x ({args.guidance} guidance, torch threads {torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
