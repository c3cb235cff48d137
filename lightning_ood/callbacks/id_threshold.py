"""The OOD threshold of one score at a given ID recall, from the ID validation images, while scoring a folder."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_ood.callbacks.score_buffer import ScoreBuffer
from lightning_ood.metrics.threshold import threshold_at_id_recall


class IDValThreshold(Callback):
    """At the end of ``trainer.predict``, scores the datamodule's ID validation split with the fitted method and
    sets :attr:`threshold` = :func:`~lightning_ood.metrics.threshold.threshold_at_id_recall` of ``score``.

    Every validation image is scored once over all ranks (the split's loader is unpadded under DDP) and the
    scores are gathered before the threshold is chosen, so N processes choose the threshold of one.

    Args:
        score: the score to threshold (a detector's or the method's own name).
        recall: the fraction of ID validation images kept as ID (``score <= threshold``), e.g. ``0.95``.
    """

    def __init__(self, score: str, recall: float = 0.95) -> None:
        self.score = score
        self.recall = recall
        self.threshold: float | None = None
        self.n_id: int = 0

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = list(pl_module.score_names)
        if self.score not in names:
            raise ValueError(f"--threshold_score {self.score!r} is not one of the method's scores {names}")
        loader = trainer.datamodule.val_dataloader()
        if not loader:
            raise ValueError(
                "is_ood needs ID validation images to choose its threshold, but data.val_fraction is 0: set "
                "data.init_args.val_fraction > 0 (the run's value), or pass --threshold=<score value>"
            )
        buffer = ScoreBuffer(1).to(pl_module.device)
        with torch.no_grad():
            for images, targets in loader:
                out = pl_module.score_batch(images.to(pl_module.device), targets.to(pl_module.device))
                buffer.update(out.scores[self.score][:, None], out.preds, out.targets)
        scores = buffer.compute()[0][:, 0]  # gathered over ranks
        self.n_id = len(scores)
        self.threshold = threshold_at_id_recall(scores, self.recall)
