"""A grid of class-conditional DDIM samples (a row per class) from a DiffusionModel checkpoint.

python docs/scripts/diffusion_samples.py <ckpt> --out docs/figures/diffusion_samples_fashionmnist.png
"""

from __future__ import annotations

import argparse

import torch
from torchvision.utils import save_image

from lightning_ood.frozen import load_method
from lightning_ood.methods import DiffusionModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--weights", default="ema", choices=["ema", "raw"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_method(args.checkpoint)
    if not isinstance(model, DiffusionModel):
        raise SystemExit(f"{args.checkpoint} is a {type(model).__name__} checkpoint, not a DiffusionModel")
    if args.weights == "raw":
        model.ema_unet = None
    labels = torch.arange(model.hparams.num_classes).repeat_interleave(args.per_class)
    images = model.sample(labels, args.steps, args.guidance, args.seed, progress=True)
    save_image((images + 1) / 2, args.out, nrow=args.per_class, padding=1, pad_value=1.0)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
