"""Turns a method's per-batch detector scores into OOD metrics, logs, result files, plots and W&B tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from rich.console import Console
from rich.progress import track
from rich.table import Table

from lightning_ood.callbacks.detector_search import search_record
from lightning_ood.callbacks.plots import plot_histograms, plot_roc, save_figure
from lightning_ood.callbacks.results import COLUMNS, build_rows, columns_for, write_results
from lightning_ood.callbacks.run_dir import run_dir
from lightning_ood.callbacks.score_buffer import ScoreBuffer
from lightning_ood.contract import MEAN_GROUPS, TestStepOutput
from lightning_ood.derived_state import rank_zero_decides
from lightning_ood.metrics import METRIC_KEYS, ood_metrics
from lightning_ood.metrics.bootstrap import bootstrap_intervals
from lightning_ood.run_info import environment_versions, run_summary

_RESERVED = {"id", *MEAN_GROUPS}


class OODEvaluation(Callback):
    """Per OOD set x score metrics, near / far / all means, result files, plots and W&B reporting.

    The scores are every configured detector's and the method's own (``pl_module.score_names``), all from the
    test step's one forward pass. ``id_acc`` (and ``test/id/acc``) exist only for methods that classify.

    The datamodule supplies ``test_set_names`` (``["id", *ood_sets]``, in ``dataloader_idx`` order) and
    ``test_set_groups`` (``{ood_set: "near" | "far"}``). Scores are gathered exactly across ranks (each sample
    once) before any metric is computed, so N processes give the metrics of one; the metrics and bootstrap
    intervals are computed once, on rank 0, and broadcast.

    Logs ``test/<set>/<detector>/<metric>``, ``test/<near|far|all>/<detector>/<metric>`` and ``test/id/acc``;
    writes ``ood_results.{json,csv,md}`` and ``plots/{roc,hist}_<detector>.png`` into the run directory (or
    ``output_dir``); with a W&B logger also logs a ``test/ood_results`` table and the plots as images.

    Args:
        output_dir: where to write results (default: the run's log directory).
        plots: draw ROC curves and score histograms.
        print_table: print AUROC and FPR95 tables when testing ends.
        bootstrap: number of bootstrap resamples for 95 % intervals of AUROC and both FPR95s (``0``: none).
            Every row then gets ``auroc_lo``, ``auroc_hi``, ``fpr95_idpos_lo``, ... (files, logs and W&B); ID
            and OOD sets are resampled separately (``lightning_ood.metrics.bootstrap``).
        bootstrap_seed: seed of the resamples (the intervals are reproducible).
        bootstrap_level: nominal coverage of the intervals.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        plots: bool = True,
        print_table: bool = True,
        bootstrap: int = 0,
        bootstrap_seed: int = 0,
        bootstrap_level: float = 0.95,
    ) -> None:
        if bootstrap < 0:
            raise ValueError(
                f"ood_eval.bootstrap must be >= 0 (0 = no intervals, e.g. 1000), got {bootstrap}"
            )
        if not 0 < bootstrap_level < 1:
            raise ValueError(f"ood_eval.bootstrap_level must be in (0, 1), e.g. 0.95, got {bootstrap_level}")
        self.output_dir = output_dir
        self.plots = plots
        self.print_table = print_table
        self.bootstrap = bootstrap
        self.bootstrap_seed = bootstrap_seed
        self.bootstrap_level = bootstrap_level
        self.rows: list[dict[str, Any]] = []
        self.output_path: Path | None = None

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "test_set_names"):
            raise RuntimeError(
                "OODEvaluation needs a datamodule with test_set_names (lightning_ood OODDataModule)"
            )
        self.set_names = list(dm.test_set_names)
        self.groups = dict(dm.test_set_groups)
        if self.set_names[0] != "id" or _RESERVED & set(self.set_names[1:]):
            raise ValueError(
                f"test sets must be ['id', *ood_sets] with no OOD set named {sorted(_RESERVED)}; "
                f"got {self.set_names}"
            )
        self.detector_names = list(pl_module.score_names)
        self.classifies = bool(getattr(pl_module, "classifies", True))
        self.buffers = [ScoreBuffer(len(self.detector_names)).to(pl_module.device) for _ in self.set_names]

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, TestStepOutput):
            raise TypeError(
                f"{type(pl_module).__name__}.test_step must return a TestStepOutput, got "
                f"{type(outputs).__name__}"
            )
        scores = torch.stack([outputs.scores[name] for name in self.detector_names], dim=1)
        self.buffers[dataloader_idx].update(scores, outputs.preds, outputs.targets)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gathered = [buf.compute() for buf in self.buffers]  # synchronised across ranks
        id_scores = gathered[0][0]
        self.run = run_summary(trainer, pl_module)
        # The metrics and bootstrap intervals are computed once, on rank 0, and broadcast to every rank.
        id_acc, self.rows = rank_zero_decides(lambda: self._metric_rows(gathered))
        self._log(pl_module, id_acc)
        directory = Path(self.output_dir) if self.output_dir else run_dir(trainer)
        self.output_path = directory
        if trainer.is_global_zero:
            run = {**self.run, "environment": environment_versions()}
            search = search_record(trainer.callbacks)
            if search is not None:
                run["detector_search"] = search
            write_results(self.rows, directory, run=run)
            figures = self._plot(directory, id_scores, gathered) if self.plots else {}
            if self.print_table:
                self._print(id_acc, directory)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    self._to_wandb(logger, figures)
        for buf in self.buffers:
            buf.reset()

    def _metric_rows(self, gathered: list) -> tuple[float | None, list[dict[str, Any]]]:
        """``(id_acc, rows)``: every OOD set x score's metrics, group means and (optionally) intervals."""
        id_scores, id_preds, id_targets = gathered[0]
        id_acc: float | None = None
        if self.classifies:
            id_acc = (id_preds == id_targets).float().mean().item() if len(id_targets) else float("nan")
        per_set: dict[str, dict[str, dict[str, float]]] = {d: {} for d in self.detector_names}
        for name, (ood_scores, _, _) in zip(self.set_names[1:], gathered[1:], strict=True):
            is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))])
            for k, det in enumerate(self.detector_names):
                scores = torch.cat([id_scores[:, k], ood_scores[:, k]]).cpu()
                per_set[det][name] = ood_metrics(scores, is_ood, set_name=f"id vs {name}, detector {det}")
        sizes = {name: len(g[0]) for name, g in zip(self.set_names, gathered, strict=True)}
        intervals = self._intervals(id_scores, gathered) if self.bootstrap else None
        return id_acc, build_rows(per_set, sizes, self.groups, len(id_scores), id_acc, self.run, intervals)

    def _intervals(self, id_scores: torch.Tensor, gathered: list) -> dict[str, dict[str, dict[str, float]]]:
        """Bootstrap intervals per detector, for every OOD set and every non-empty near / far / all group."""
        ood_sets = self.set_names[1:]
        groups = {g: [s for s in ood_sets if g == "all" or self.groups[s] == g] for g in MEAN_GROUPS}
        groups = {g: members for g, members in groups.items() if members}
        out = {}
        for k, det in enumerate(
            track(self.detector_names, description="bootstrap intervals", transient=True)
        ):
            ood = {n: g[0][:, k].cpu() for n, g in zip(ood_sets, gathered[1:], strict=True)}
            out[det] = bootstrap_intervals(
                id_scores[:, k].cpu(), ood, groups, self.bootstrap, self.bootstrap_seed, self.bootstrap_level
            )
        return out

    def _log(self, pl_module: LightningModule, id_acc: float | None) -> None:
        values = {} if id_acc is None else {"test/id/acc": id_acc}
        keys = [*METRIC_KEYS, *columns_for(self.rows)[len(COLUMNS) :]]
        for row in self.rows:
            values.update({f"test/{row['set']}/{row['detector']}/{k}": row[k] for k in keys})
        pl_module.log_dict(values, add_dataloader_idx=False, sync_dist=False)

    def _plot(self, directory: Path, id_scores: torch.Tensor, gathered: list) -> dict[str, list[Path]]:
        figures: dict[str, list[Path]] = {"roc": [], "hist": []}
        for k, det in enumerate(self.detector_names):
            ood = {n: g[0][:, k].cpu().numpy() for n, g in zip(self.set_names[1:], gathered[1:], strict=True)}
            ids = id_scores[:, k].cpu().numpy()
            auroc = {r["set"]: r["auroc"] for r in self.rows if r["detector"] == det and r["kind"] == "set"}
            figures["roc"].append(
                save_figure(plot_roc(det, ids, ood, auroc), directory / "plots" / f"roc_{det}.png")
            )
            figures["hist"].append(
                save_figure(plot_histograms(det, ids, ood), directory / "plots" / f"hist_{det}.png")
            )
        return figures

    def _print(self, id_acc: float | None, directory: Path) -> None:
        console = Console(width=max(120, 14 * (len(self.set_names) + 4)))
        acc = "- (the method does not classify)" if id_acc is None else f"{id_acc:.4f}"
        console.print(f"\n[bold]ID accuracy[/bold]: {acc}    results: {directory}/ood_results.md")
        columns = [
            *self.set_names[1:],
            *[g for g in MEAN_GROUPS if any(r["set"] == g and r["kind"] == "mean" for r in self.rows)],
        ]
        for metric, title in (
            ("auroc", "AUROC (higher is better)"),
            ("fpr95_idpos", "FPR@95%TPR, ID positive (lower is better)"),
        ):
            table = Table(title=title, title_justify="left")
            table.add_column("score")
            for col in columns:
                table.add_column(col, justify="right")
            for det in self.detector_names:
                cells = {r["set"]: r[metric] for r in self.rows if r["detector"] == det}
                table.add_row(det, *[f"{cells[c]:.4f}" for c in columns])
            console.print(table)

    def _to_wandb(self, logger: WandbLogger, figures: dict[str, list[Path]]) -> None:
        columns = columns_for(self.rows)
        logger.log_table(
            key="test/ood_results",
            columns=list(columns),
            data=[[row[c] for c in columns] for row in self.rows],
        )
        for kind, paths in figures.items():
            if paths:
                logger.log_image(
                    key=f"test/plots/{kind}",
                    images=[str(p) for p in paths],
                    caption=list(self.detector_names),
                )
