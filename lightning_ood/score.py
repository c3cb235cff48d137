"""Score a folder of images with a trained method: one CSV row per image (path, predicted class, every score).

    python -m lightning_ood.score --config logs/lightning-ood/<run id>/config.yaml \
        --ckpt_path logs/lightning-ood/<run id>/checkpoints/best-....ckpt --images path/to/folder \
        [--output scores.csv]

The run's config supplies the method, its detectors and the data (the ID training set the detectors are fitted
on, image size, channels, normalisation); the fit is cached beside the checkpoint as in ``evaluate.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_ood.callbacks.score_writer import ScoreWriter
from lightning_ood.cli import OODCLI, check_ready


def score(args: Sequence[str] | None = None) -> Path:
    """Run the scorer; returns the CSV written."""
    cli = OODCLI(entry="score", args=args)
    images = cli.config.images
    if not images:
        raise ValueError("--images is required: the folder of images to score")
    check_ready(cli.model, cli.config.ckpt_path)
    paths = cli.datamodule.set_predict_images(images)
    output = Path(cli.config.output or Path(images) / "ood_scores.csv")
    cli.trainer.callbacks.append(ScoreWriter(output, paths))
    cli.trainer.predict(
        cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, return_predictions=False
    )
    return output


if __name__ == "__main__":  # pragma: no cover - console entry
    score()
