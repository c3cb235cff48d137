"""LightningCLI entry points: ``train.py`` (fit, then test the best checkpoint) and ``evaluate.py`` (test)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.data import OODDataModule
from lightning_ood.methods.base import OODMethod

#: The default logger: W&B, offline (no account, no network). Opt in to syncing with ``offline: false``.
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "lightning-ood", "save_dir": "logs", "offline": True},
}


#: Arguments of one entry point only: ``train.py --test_after_fit``, ``evaluate.py --ckpt_path``.
ENTRY_ONLY_KEYS = ("test_after_fit", "ckpt_path")


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves the full config into the run directory and sends it to every logger (W&B config).

    Besides the nested config, the run carries flat ``method``, ``backbone``, ``dataset`` and ``seed`` keys so
    W&B runs can be grouped and compared on them.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        directory = run_dir(trainer)  # collective: every rank calls it
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            # Leave out what only one entry point takes, so the saved config works with train.py and evaluate.py.
            config = self.config.clone()
            for key in ENTRY_ONLY_KEYS:
                if key in config:
                    del config[key]
            self.parser.save(
                config,
                directory / self.config_filename,
                skip_none=False,
                skip_check=True,
                overwrite=True,
                multifile=self.multifile,
            )
            summary = {
                **getattr(pl_module, "run_config", {}),
                "dataset": getattr(trainer.datamodule, "dataset_name", ""),
                "seed": self.config.get("seed_everything"),
            }
            config = self.config.as_dict()
            config.pop("config", None)  # the paths of the YAML files given, not a setting
            for logger in trainer.loggers:
                logger.log_hyperparams({**summary, "config": config})
        self.already_saved = True


class OODCLI(LightningCLI):
    """The project's LightningCLI: omegaconf interpolation, ``data.num_classes`` / ``data.channels`` linked into
    the model, the OOD evaluation and best-checkpoint callbacks always present, W&B logging by default."""

    def __init__(self, *, entry: str = "train", args: Sequence[str] | None = None, **kwargs: Any) -> None:
        self.entry = entry
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
        super().__init__(
            OODMethod,
            OODDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggerSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf"},
            seed_everything_default=0,
            run=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.in_chans", apply_on="instantiate")
        parser.add_lightning_class_args(OODEvaluation, "ood_eval")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.save_last": True,
            }
        )
        if self.entry == "train":
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="After fitting, test the best checkpoint (by checkpoint.monitor).",
            )
        else:
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="Checkpoint to test; leave unset for a frozen pretrained model.",
            )


def train(args: Sequence[str] | None = None) -> OODCLI:
    """Fit, then (unless ``--test_after_fit=false``) test the best checkpoint."""
    cli = OODCLI(entry="train", args=args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.config.test_after_fit:
        ckpt = cli.trainer.checkpoint_callback
        best = ckpt.best_model_path if isinstance(ckpt, ModelCheckpoint) else ""
        if not best:
            rank_zero_warn("No best checkpoint was saved (e.g. fast_dev_run); testing the current weights.")
        cli.trainer.test(
            cli.model, datamodule=cli.datamodule, ckpt_path="best" if best else None, verbose=False
        )
    return cli


def evaluate(args: Sequence[str] | None = None) -> OODCLI:
    """Test a checkpoint (``--ckpt_path``) or, without one, the model as configured (e.g. frozen pretrained)."""
    cli = OODCLI(entry="evaluate", args=args)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, verbose=False)
    return cli


def main() -> None:  # pragma: no cover - console script
    train()


__all__ = ["DEFAULT_LOGGER", "OODCLI", "OODMethod", "evaluate", "main", "train"]
