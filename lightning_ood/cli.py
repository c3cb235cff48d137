"""LightningCLI entry points: ``train.py`` (fit, then test the best checkpoint) and ``evaluate.py`` (test)."""

from __future__ import annotations

import importlib
import secrets
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ood.callbacks.detector_search import DetectorSearch
from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.cli_errors import MOVED_OPTIONS, check_checkpoint, explain_parse_error, moved_option_error
from lightning_ood.data import OODDataModule
from lightning_ood.methods.base import OODMethod
from lightning_ood.run_info import RunFacts, environment_versions, global_seed, run_name, run_summary
from lightning_ood.shipped_configs import resolve_config_args

#: The default logger: W&B, offline (no account, no network). Opt in to syncing with ``offline: false``.
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "lightning-ood", "save_dir": "logs", "offline": True},
}


#: Arguments of one entry point only: ``train.py --test_after_fit``, ``evaluate.py --ckpt_path``, the scorer's
#: ``--images``, ``--output``, ... (see :mod:`lightning_ood.score`).
ENTRY_ONLY_KEYS = (
    "test_after_fit",
    "ckpt_path",
    "images",
    "output",
    "overwrite",
    "skip_unreadable",
    "log_run",
    "threshold_score",
    "id_recall",
    "threshold",
    *MOVED_OPTIONS,
)
#: W&B ``job_type`` of each entry point.
JOB_TYPES = {"train": "train", "evaluate": "evaluate", "score": "score"}
#: Where a run without a logger writes (a fresh ``run-<time>-<random>`` folder per run).
NO_LOGGER_ROOT = "logs"
#: ``checkpoint.monitor`` / ``checkpoint.mode`` value meaning "what the method declares"
#: (:attr:`OODMethod.checkpoint_monitor`).
AUTO = "auto"


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves the full config into the run directory and sends it to every logger (W&B config).

    Besides the nested config, the run carries flat run facts (:func:`~lightning_ood.run_info.run_summary`:
    ``method``, ``backbone``, ``dataset``, ``seed`` as an int, the split seed as ``data_seed``, ...) so W&B runs
    can be grouped and compared on them, and the ``environment`` (python, torch, ... versions). Lightning logs
    the model's and datamodule's hyperparameters after ``setup`` (the datamodule's split ``seed`` would replace
    the training seed), so the facts are logged again when each stage starts.
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

    def _relog_facts(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            summary = run_summary(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_hyperparams(summary)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._relog_facts(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._relog_facts(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._relog_facts(trainer, pl_module)


class OODCLI(LightningCLI):
    """The project's LightningCLI: omegaconf interpolation, ``data.num_classes`` / ``data.channels`` linked into
    the model, the OOD evaluation and best-checkpoint callbacks always present, W&B logging by default.

    Options must be spelled out (no prefix matching: ``--trainer.max_epoch`` is an error, not ``max_epochs``);
    a bad option or class fails with one line naming the nearest valid names. The optimiser and schedule are
    the model's (``model.init_args.optimizer`` / ``scheduler``): there is no top-level ``--optimizer`` that
    would silently replace both. A ``.yaml`` argument that is not a file where given is looked up among the
    shipped configs (:mod:`lightning_ood.shipped_configs`). W&B runs get ``job_type`` = the entry point
    (``train`` / ``evaluate`` / ``score``) and the name ``<method>-<backbone>-<dataset>-s<seed>`` unless the
    logger's ``name`` / ``job_type`` are set. Without a logger, a run writes into a fresh
    ``logs/run-<time>-<random>`` folder (unless ``trainer.default_root_dir`` is set), never into the current
    directory.
    """

    def __init__(self, *, entry: str = "train", args: Sequence[str] | None = None, **kwargs: Any) -> None:
        self.entry = entry
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
        try:
            with warnings.catch_warnings():
                # The command line is handed over as `args` (rewritten by _prepare_args), not a second set of them.
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                super().__init__(
                    OODMethod,
                    OODDataModule,
                    subclass_mode_model=True,
                    subclass_mode_data=True,
                    save_config_callback=LoggerSaveConfigCallback,
                    save_config_kwargs={"overwrite": True},
                    parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False, "exit_on_error": False},
                    seed_everything_default=0,
                    auto_configure_optimizers=False,
                    run=False,
                    args=_prepare_args(args, entry),
                    **kwargs,
                )
        except ArgumentError as err:
            print(f"error: {explain_parse_error(str(err), self.parser)}", file=sys.stderr)
            raise SystemExit(2) from None
        self.run_facts = RunFacts()
        self.trainer.callbacks.append(self.run_facts)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.in_chans", apply_on="instantiate")
        # accepted as null only (configs saved by 0.1 have them); see before_instantiate_classes
        for name in MOVED_OPTIONS:
            parser.add_argument(
                f"--{name}", type=Any, default=None, help=f"Not used: set --{MOVED_OPTIONS[name]}."
            )
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
            parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing CSV.")
            parser.add_argument(
                "--skip_unreadable",
                type=bool,
                default=False,
                help="Leave out (with a warning) image files that cannot be decoded, instead of failing.",
            )
            parser.add_argument(
                "--log_run",
                type=bool,
                default=False,
                help="Log this scoring to the configured logger (a W&B run with job_type=score); off: no logging.",
            )
            parser.add_argument(
                "--threshold_score",
                type=str | None,
                default=None,
                help="The score is_ood thresholds (default: the first score, e.g. msp).",
            )
            parser.add_argument(
                "--id_recall",
                type=float,
                default=0.95,
                help="is_ood threshold: the fraction of ID validation images kept as ID.",
            )
            parser.add_argument(
                "--threshold",
                type=float | None,
                default=None,
                help="is_ood threshold as a score value (instead of choosing it at --id_recall).",
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

    def inspect_checkpoint(self, ckpt_path: str | None) -> None:
        """Before any weights are loaded: fail in one line when ``ckpt_path`` does not fit the configured model
        (naming the differing hyperparameters), and take the checkpoint's training seed for the run facts."""
        if ckpt_path is not None:
            self.run_facts.checkpoint_seed = check_checkpoint(self.model, ckpt_path)
        self.name_wandb_runs()

    def name_wandb_runs(self) -> None:
        """W&B ``job_type`` = the entry point and a readable run ``name``, unless the logger sets its own."""
        seed = self.run_facts.checkpoint_seed
        facts = {
            **getattr(self.model, "run_config", {}),
            "dataset": getattr(self.datamodule, "dataset_name", ""),
            "seed": global_seed() if seed is None else seed,
        }
        for logger in self.trainer.loggers:
            # Lightning keeps wandb.init's arguments until the run starts (on first use of logger.experiment).
            init = getattr(logger, "_wandb_init", None)
            if isinstance(logger, WandbLogger) and logger._experiment is None and isinstance(init, dict):
                init["job_type"] = init.get("job_type") or JOB_TYPES[self.entry]
                init["name"] = init.get("name") or run_name(facts)

    def before_instantiate_classes(self) -> None:
        """``checkpoint.monitor: auto`` / ``checkpoint.mode: auto`` -> what the configured method declares; a run
        without a logger (and without ``trainer.default_root_dir``) gets a fresh folder under ``logs/``."""
        config = self.config
        for name in MOVED_OPTIONS:
            if config.get(name) is not None:
                raise ValueError(moved_option_error(name))
        if self.entry == "score" and not config.log_run:
            config.trainer.logger = False
        if not config.trainer.logger and config.trainer.default_root_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config.trainer.default_root_dir = f"{NO_LOGGER_ROOT}/run-{stamp}-{secrets.token_hex(3)}"
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


def _prepare_args(args: Sequence[str] | None, entry: str) -> list[str]:
    """``args`` (default: the command line) without a leading subcommand word (``train.py fit ...``,
    ``lightning-ood test ...``) and with ``.yaml`` arguments that are not files pointed at the shipped configs.
    ``sys.argv`` is left as it is: Lightning's DDP launcher starts the other processes from it."""
    given = list(sys.argv[1:] if args is None else args)
    if given and given[0] == {"train": "fit", "evaluate": "test", "score": "score"}[entry]:
        given = given[1:]
    return resolve_config_args(given)


def train(args: Sequence[str] | None = None) -> OODCLI:
    """Fit, then (unless ``--test_after_fit=false``) test the best checkpoint."""
    cli = OODCLI(entry="train", args=args)
    cli.name_wandb_runs()
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
    cli.inspect_checkpoint(cli.config.ckpt_path)
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


__all__ = ["DEFAULT_LOGGER", "OODCLI", "OODMethod", "evaluate", "train"]
