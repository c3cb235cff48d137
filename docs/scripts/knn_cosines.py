"""How close ID test images come to their nearest ID training image in a method's feature space (cosine).

    python docs/scripts/knn_cosines.py \
        results/quickstart/fashionmnist/classifier/seed0/log/version_0/checkpoints/best-epoch=001.ckpt --test-limit 1000

The reference for reading k-NN scores and the feature-matching attack's cosines (docs/frozen_encoders.md): an
attacked image must come this close to an ID training image before k-NN takes it for ID.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lightning_ood.data import IDSetSpec, OODDataModule
from lightning_ood.frozen import load_method


def normalised_features(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.normalize(model.forward_outputs(x).features, dim=1) for x, _ in loader])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--source", default="fashionmnist")
    parser.add_argument("--test-limit", type=int, default=1000)
    args = parser.parse_args()
    model = load_method(args.checkpoint)
    dm = OODDataModule(IDSetSpec(args.source), eval_batch_size=1000, test_limit=args.test_limit)
    dm.setup()
    bank = normalised_features(model, dm.fit_dataloader())
    test = normalised_features(model, dm.test_dataloader()[0])
    nearest = torch.cat([(chunk @ bank.T).amax(dim=1) for chunk in test.split(1000)])
    q = torch.tensor([0.05, 0.5])
    lo, mid = nearest.quantile(q).tolist()
    print(
        f"{len(test)} ID test images vs {len(bank)} ID training images: nearest cosine median {mid:.3f}, "
        f"5th percentile {lo:.3f}, mean {nearest.mean():.3f}"
    )


if __name__ == "__main__":
    main()
