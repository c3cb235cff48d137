"""Writes the scores of ``trainer.predict`` over a folder of images: one CSV row per image."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_ood.callbacks.results import atomic_write
from lightning_ood.callbacks.score_buffer import ScoreBuffer
from lightning_ood.contract import TestStepOutput


class ScoreWriter(Callback):
    """Collects every predict batch's scores (exactly once per image under DDP) and writes ``output``.

    Columns: ``path``, then ``pred`` and ``pred_name`` (the predicted class index and name) when the method
    classifies, then one column per score (every detector and the method's own; higher = more OOD). Rows follow
    ``paths``. The file is written atomically by rank 0.

    Args:
        output: the CSV file to write.
        paths: the scored files, indexed by each batch's targets (see ``OODDataModule.set_predict_images``).
    """

    def __init__(self, output: str | os.PathLike, paths: Sequence[Path]) -> None:
        self.output = Path(output)
        self.paths = list(paths)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.names = list(pl_module.score_names)
        self.classifies = bool(getattr(pl_module, "classifies", True))
        self.buffer = ScoreBuffer(len(self.names)).to(pl_module.device)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, TestStepOutput):
            raise TypeError(f"predict_step must return a TestStepOutput, got {type(outputs).__name__}")
        scores = torch.stack([outputs.scores[name] for name in self.names], dim=1)
        self.buffer.update(scores, outputs.preds, outputs.targets)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scores, preds, rows = self.buffer.compute()  # gathered over ranks
        if not trainer.is_global_zero:
            return
        if sorted(rows.tolist()) != list(range(len(self.paths))):
            raise RuntimeError(
                f"scored {len(rows)} rows for {len(self.paths)} images: some were lost or repeated"
            )
        order = rows.argsort()
        scores, preds, rows = scores[order].cpu(), preds[order].cpu(), rows[order].cpu()
        classes = getattr(trainer.datamodule, "class_names", None) if self.classifies else None
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        head = ["path", *(["pred", "pred_name"] if self.classifies else []), *self.names]
        writer.writerow(head)
        for k, row in enumerate(rows.tolist()):
            pred = [int(preds[k]), classes[int(preds[k])] if classes else ""] if self.classifies else []
            writer.writerow([str(self.paths[row]), *pred, *(repr(float(v)) for v in scores[k])])
        self.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.output, buf.getvalue())
        print(f"Wrote {len(rows)} rows of {len(self.names)} scores to {self.output}")
