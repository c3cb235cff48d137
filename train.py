"""Train a method, then test its best checkpoint: ``python train.py --config configs/quickstart.yaml``."""

from lightning_ood.cli import train

if __name__ == "__main__":
    train()
