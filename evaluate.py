"""Test a checkpoint (or a frozen pretrained model): ``python evaluate.py --config CFG --ckpt_path CKPT``."""

from lightning_ood.cli import evaluate

if __name__ == "__main__":
    evaluate()
