"""How DiffGuard's scores and their AUROC change with the diffusion network's execution options (channels_last,
bf16 / fp16 autocast) against float32, on real images and trained models.

    python benchmarks/diffguard_precision.py --classifier <classifier ckpt> --diffusion <diffusion ckpt> \
        --test-limit 200 --ood-limit 40 --steps 10 [--guidance classifier] [--old-defaults]

``--old-defaults``: the settings the table of docs/diffguard.md was measured with (before the presets: full
inversion ``t_star = 1.0``, the unconditional reference, no Grad-CAM mask; the logits distance is now L1).

Fashion-MNIST test images (a seeded subset of ``--test-limit``) against the six far-OOD sets of
``configs/data/fashionmnist.yaml`` (``--ood-limit`` each). For every option and every ``diffguard_*`` score: the
AUROC (ID against all OOD images pooled), the largest change of a score against float32 in units of the float32
scores' standard deviation, Spearman's rank correlation with float32, and images / s. Prints a Markdown table
(docs/diffguard.md, "Speed").
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_ood.data import IDSetSpec, OODDataModule, OODSetSpec
from lightning_ood.detectors import Energy
from lightning_ood.methods import DiffGuard
from lightning_ood.metrics.functional import ood_metrics

FAR_SETS = ("digits", "faces", "textures", "photos", "gaussian", "uniform")
NOISE = ("gaussian", "uniform")
SETTINGS = {
    "float32": {},
    "float32, channels_last": {"channels_last": True},
    "bf16-mixed": {"diffusion_precision": "bf16-mixed"},
}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", required=True, help="a Fashion-MNIST classifier checkpoint")
    parser.add_argument("--diffusion", required=True, help="a DiffusionModel checkpoint or pipeline folder")
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--ood-limit", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", default="classifier_free", choices=["classifier_free", "classifier"])
    parser.add_argument("--batch", type=int, default=64, help="images per diffusion pass")
    parser.add_argument("--fp16", action="store_true", help="also 16-mixed (slow on most CPUs)")
    parser.add_argument("--old-defaults", action="store_true", help="the settings before the presets (doc)")
    args = parser.parse_args()
    old = {"t_star": 1.0, "reference": "unconditional", "grad_cam": False} if args.old_defaults else {}
    settings = dict(SETTINGS)
    if args.fp16:
        settings["fp16-mixed"] = {"diffusion_precision": "16-mixed"}
    noise = {"size": 28, "channels": 1}
    ood = [
        OODSetSpec(name=n, source=n, group="far", limit=args.ood_limit, options=noise if n in NOISE else {})
        for n in FAR_SETS
    ]
    data = OODDataModule(
        IDSetSpec("fashionmnist"), ood, test_limit=args.test_limit, eval_batch_size=args.batch
    )
    data.setup("test")
    batches = [(x, int(i > 0)) for i, loader in enumerate(data.test_dataloader()) for x, _ in loader]
    scores, rates = {}, {}
    for label, options in settings.items():
        method = DiffGuard(
            args.classifier, args.diffusion, num_classes=10, in_chans=1, steps=args.steps,
            guidance=args.guidance, input_mean=[0.5], input_std=[0.5], detectors=[Energy()], combine_with=None,
            diffusion_batch_size=args.batch, **old, **options,
        ).eval()  # fmt: skip
        parts = []
        with torch.inference_mode():
            method.native_scores(method.forward_outputs(batches[0][0][:2]), batches[0][0][:2])  # warm-up
            start = time.perf_counter()
            for x, _ in batches:
                parts.append(method.native_scores(method.forward_outputs(x), x))
        rates[label] = sum(len(x) for x, _ in batches) / (time.perf_counter() - start)
        scores[label] = {k: torch.cat([p[k] for p in parts]).double() for k in parts[0]}
    is_ood = torch.cat([torch.full((len(x),), o) for x, o in batches])
    base = scores["float32"]
    print(f"{args.guidance} guidance, {args.steps} DDIM steps, {int((is_ood == 0).sum())} ID / "
          f"{int(is_ood.sum())} OOD images\n")  # fmt: skip
    print("| setting | images / s | score | AUROC | largest change / std of float32 | Spearman vs float32 |")
    print("|---|---:|---|---:|---:|---:|")
    for label, values in scores.items():
        for name, value in values.items():
            auroc = 100 * ood_metrics(value.numpy(), is_ood.numpy())["auroc"]
            change = float((value - base[name]).abs().max() / base[name].std())
            print(f"| {label} | {rates[label]:.1f} | {name} | {auroc:.2f} | {change:.3f} | "
                  f"{spearman(value, base[name]):.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
