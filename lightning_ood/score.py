"""Score a folder of images with a trained method: one CSV row per image (path, predicted class, every score,
and ``is_ood``).

    lightning-ood score --config logs/lightning-ood/<run id>/config.yaml \
        --ckpt_path logs/lightning-ood/<run id>/checkpoints/best-....ckpt --images path/to/folder \
        [--output scores.csv] [--threshold_score msp] [--id_recall 0.95] [--skip_unreadable true]

(``python -m lightning_ood.score`` is the same.) The run's config supplies the method, its detectors and the
data (the ID training set the detectors are fitted on, image size, channels, normalisation); the fit is cached
beside the checkpoint as in ``evaluate.py``. ``is_ood`` is 1 where ``threshold_score`` (default: the first
score) is above the threshold that keeps ``id_recall`` of the ID validation images as ID
(:func:`~lightning_ood.metrics.threshold.threshold_at_id_recall`), or above ``--threshold`` when given.

Scoring logs nothing (no W&B run, no run folder) unless ``--log_run=true``; it refuses to overwrite an existing
CSV unless ``--overwrite=true``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback

from lightning_ood.callbacks.id_threshold import IDValThreshold
from lightning_ood.callbacks.results import atomic_write
from lightning_ood.callbacks.score_writer import ScoreWriter
from lightning_ood.cli import OODCLI, check_ready


def score(args: Sequence[str] | None = None) -> Path:
    """Run the scorer; returns the CSV written."""
    cli = OODCLI(entry="score", args=args)
    cfg = cli.config
    if not cfg.images:
        raise ValueError("--images is required: the folder of images to score")
    check_ready(cli.model, cfg.ckpt_path)
    output = Path(cfg.output or Path(cfg.images) / "ood_scores.csv")
    if output.exists() and not cfg.overwrite:
        raise FileExistsError(
            f"{output} exists (an earlier scoring?): pass --output=<another file>, or --overwrite=true to replace it"
        )
    cli.inspect_checkpoint(cfg.ckpt_path)
    if not cfg.log_run:  # no run folder, no config.yaml: scoring is not an experiment unless asked
        cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if not isinstance(cb, SaveConfigCallback)]
    try:
        paths = cli.datamodule.set_predict_images(cfg.images, skip_unreadable=cfg.skip_unreadable)
    except OSError as err:
        raise OSError(f"{err}\n(When scoring, leave them out with --skip_unreadable=true.)") from None
    name = cfg.threshold_score or cli.model.score_names[0]
    chooser = IDValThreshold(name, cfg.id_recall) if cfg.threshold is None else None
    cli.trainer.callbacks += [ScoreWriter(output, paths), *([chooser] if chooser else [])]
    cli.trainer.predict(
        cli.model, datamodule=cli.datamodule, ckpt_path=cfg.ckpt_path, return_predictions=False
    )
    threshold = cfg.threshold if chooser is None else chooser.threshold
    if cli.trainer.is_global_zero:
        _add_is_ood(output, name, threshold)
        how = (
            "given"
            if chooser is None
            else f"keeps {cfg.id_recall:.0%} of {chooser.n_id} ID validation images"
        )
        print(f"is_ood = {name} > {threshold!r} (threshold {how})")
    return output


def _add_is_ood(output: Path, name: str, threshold: float) -> None:
    """Append the ``is_ood`` column (``1``: ``name`` above ``threshold``) to the CSV written by ScoreWriter."""
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    column = rows[0].index(name)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*rows[0], "is_ood"])
    writer.writerows([*row, int(float(row[column]) > threshold)] for row in rows[1:])
    atomic_write(output, buf.getvalue())


if __name__ == "__main__":  # pragma: no cover - console entry
    score()
