"""The one folder a run writes its results, plots and config into."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger


def run_dir(trainer: Trainer) -> Path:
    """The run's log directory, the same on every rank (all ranks must call this: it broadcasts).

    W&B: ``<save_dir>/<project>/<run id>`` (where Lightning also puts the run's checkpoints); CSV and
    TensorBoard loggers: their ``log_dir``; no logger: ``trainer.default_root_dir``.
    """
    path: str | None = None
    if trainer.is_global_zero:
        logger = trainer.loggers[0] if trainer.loggers else None
        if isinstance(logger, WandbLogger):
            path = str(
                Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / str(logger.version)
            )
        elif isinstance(logger, (CSVLogger, TensorBoardLogger)):
            path = logger.log_dir
        else:
            path = trainer.default_root_dir
    return Path(trainer.strategy.broadcast(path))
