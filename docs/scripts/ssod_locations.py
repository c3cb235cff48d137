"""What SSOD samples as ID and OOD locations: how many of each lie on blank background, and a picture.

    python docs/scripts/ssod_locations.py \
        results/ssod/compare/fashionmnist/ssod/seed0/log/version_0/checkpoints/best-*.ckpt \
        --out docs/figures/ssod_masks_fashionmnist.png

For ``--n`` ID training images (not augmented, labels as in training) it counts the ID and OOD locations of the
final feature map whose input block (the image cut into an h x w grid) is blank (every pixel below ``--blank``
in [0, 1]), and draws the masks of the first 8 images with the ``SSODMasks`` callback's figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_ood.callbacks.plots import save_figure
from lightning_ood.callbacks.ssod_masks import SSODMasks
from lightning_ood.callbacks.test_pictures import denormalise
from lightning_ood.data import IDSetSpec, OODDataModule
from lightning_ood.frozen import load_method


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--blank", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = load_method(args.checkpoint)
    dm = OODDataModule(IDSetSpec("fashionmnist"), eval_batch_size=500, train_limit=args.n)
    dm.setup()
    counts = torch.zeros(2, 2)  # [id, ood] x [blank, not blank]
    first = None
    with torch.no_grad():
        for images, labels in dm.fit_dataloader():
            id_mask, ood_mask, _ = model.location_maps(images, labels)
            h, w = id_mask.shape[-2:]
            peak = F.adaptive_max_pool2d(denormalise(images, dm).amax(dim=1, keepdim=True), (h, w))[:, 0]
            blank = peak < args.blank
            for row, mask in enumerate((id_mask, ood_mask)):
                counts[row, 0] += (mask & blank).sum()
                counts[row, 1] += (mask & ~blank).sum()
            first = first or (images[:8], labels[:8])
    for row, kind in enumerate(("ID", "OOD")):
        total = counts[row].sum()
        share = 100 * counts[row, 0] / total
        print(f"{kind} locations: {int(total)} over {args.n} images, {share:.1f} % on blank background")
    if args.out is not None:
        figure = SSODMasks(num_images=8)._figure("train", model, *first, dm)
        print(f"picture: {save_figure(figure, args.out)}")


if __name__ == "__main__":
    main()
