"""LightningCLI entry points: ``train.py`` (fit, then test the best checkpoint) and ``evaluate.py`` (test)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ood.callbacks.detector_search import DetectorSearch
from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.data import OODDataModule
from lightning_ood.methods.base import OODMethod
from lightning_ood.run_info import environment_versions, run_summary

#: The default logger: W&B, offline (no account, no network). Opt in to syncing with ``offline: false``.
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "lightning-ood", "save_dir": "logs", "offline": True},
}


#: Arguments of one entry point only: ``train.py --test_after_fit``, ``evaluate.py --ckpt_path``, the scorer's
#: ``--images`` / ``--output``.
ENTRY_ONLY_KEYS = ("test_after_fit", "ckpt_path", "images", "output")
#: ``checkpoint.monitor`` / ``checkpoint.mode`` value meaning "what the method declares"
#: (:attr:`OODMethod.checkpoint_monitor`).
AUTO = "auto"


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves the full config into the run directory and sends it to every logger (W&B config).

    Besides the nested config, the run carries flat ``method``, ``backbone``, ``dataset`` and ``seed`` keys so
    W&B runs can be grouped and compared on them, and the ``environment`` (python, torch, ... versions).
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
            summary = {**run_summary(trainer, pl_module), "environment": environment_versions()}
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
        parser.add_lightning_class_args(DetectorSearch, "detector_search")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": AUTO,
                "checkpoint.mode": AUTO,
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
        if self.entry == "score":
            parser.add_argument(
                "--images", type=str, help="Folder of images to score (searched recursively)."
            )
            parser.add_argument(
                "--output",
                type=str | None,
                default=None,
                help="CSV to write (default: <images>/ood_scores.csv).",
            )

    def instantiate_classes(self) -> None:
        """Instantiate, but report a bad setting with our own one-line messages, not the parser's nested union
        dump (e.g. ``OOD set 'x'.group: must be one of ['near', 'far'], got 'mid'``)."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            reasons = _own_reasons(str(err))
            if not reasons:
                raise
            raise ValueError("; ".join(reasons)) from None

    def before_instantiate_classes(self) -> None:
        """``checkpoint.monitor: auto`` / ``checkpoint.mode: auto`` -> what the configured method declares."""
        config = self.config
        module_name, _, name = str(config.model.class_path).rpartition(".")
        method = getattr(importlib.import_module(module_name), name)
        declared = getattr(method, "checkpoint_monitor", None)
        if config.checkpoint.monitor == AUTO:
            config.checkpoint.monitor = declared[0] if declared else None
        if config.checkpoint.mode == AUTO:
            follows = declared is not None and config.checkpoint.monitor == declared[0]
            config.checkpoint.mode = declared[1] if follows else "min"
        if config.checkpoint.mode not in ("min", "max"):
            raise ValueError(
                f"checkpoint.mode must be 'min', 'max' or 'auto', got {config.checkpoint.mode!r}"
            )


_PARSER_LINES = ("Does not validate", "Subtypes:", "Errors:", "Expected a", "Given value", "Not a valid")


def _own_reasons(message: str) -> list[str]:
    """The lines of a jsonargparse union error that are not the parser's own bookkeeping (deduplicated)."""
    lines = (line.strip().removeprefix("- ").strip() for line in message.splitlines())
    return list(dict.fromkeys(x for x in lines if x and not x.startswith(_PARSER_LINES)))


def train(args: Sequence[str] | None = None) -> OODCLI:
    """Fit, then (unless ``--test_after_fit=false``) test the best checkpoint."""
    cli = OODCLI(entry="train", args=args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.config.test_after_fit:
        cli.trainer.test(
            cli.model, datamodule=cli.datamodule, ckpt_path=_checkpoint_to_test(cli.trainer), verbose=False
        )
    return cli


def _checkpoint_to_test(trainer: Trainer) -> str | None:
    """The best checkpoint by ``checkpoint.monitor``; else the last one, or the current weights, saying why."""
    ckpt = trainer.checkpoint_callback
    if not isinstance(ckpt, ModelCheckpoint):
        rank_zero_warn("No ModelCheckpoint callback: testing the current weights.")
        return None
    if ckpt.monitor is None and ckpt.last_model_path:
        rank_zero_info(
            f"{type(trainer.lightning_module).__name__} declares no validation metric to choose a best checkpoint "
            f"by: testing the last checkpoint {ckpt.last_model_path}"
        )
        return ckpt.last_model_path
    if ckpt.best_model_path:
        return ckpt.best_model_path
    if ckpt.last_model_path:
        rank_zero_warn(
            f"No best checkpoint by {ckpt.monitor!r}: the metric was never logged (validation off, e.g. "
            f"data.val_fraction=0?). Testing the last checkpoint {ckpt.last_model_path}"
        )
        return ckpt.last_model_path
    rank_zero_warn("No checkpoint was saved (e.g. fast_dev_run); testing the current weights.")
    return None


def evaluate(args: Sequence[str] | None = None) -> OODCLI:
    """Test a checkpoint (``--ckpt_path``) or, without one, the model as configured (e.g. frozen pretrained)."""
    cli = OODCLI(entry="evaluate", args=args)
    check_ready(cli.model, cli.config.ckpt_path)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, verbose=False)
    return cli


def check_ready(model: LightningModule, ckpt_path: str | None) -> None:
    """Refuse to evaluate, without a checkpoint, a method whose weights only training gives (a random head)."""
    if ckpt_path is None and not getattr(model, "ready_without_training", True):
        raise ValueError(
            f"{type(model).__name__} is evaluated without --ckpt_path, but its weights (e.g. its classification "
            "head) come only from training: pass --ckpt_path, load weights that include the head for exactly "
            "data.num_classes classes (pretrained / weights_path), or use a method made for frozen encoders."
        )


def main() -> None:  # pragma: no cover - console script
    train()


__all__ = ["DEFAULT_LOGGER", "OODCLI", "OODMethod", "evaluate", "main", "train"]
