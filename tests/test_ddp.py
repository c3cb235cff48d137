"""Distributed evaluation is sample-exact: 2 CPU processes (DDP, gloo) give the metrics of one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ood.callbacks.results import read_results
from lightning_ood.metrics import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data",
    "configs/data/digits_tiny.yaml",
    "--model",
    "configs/model/classifier_tiny.yaml",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--ood_eval.plots=false",
    "--ood_eval.print_table=false",
    "--trainer.enable_model_summary=false",
]


def _run(script: str, args: list[str], tmp: Path) -> None:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, script, *TINY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _rows(directory: Path) -> dict:
    rows = read_results(directory / "ood_results.json")[1]
    return {(r["detector"], r["set"]): r for r in rows}


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    _run(
        "train.py",
        [*logger, "--trainer.devices=1", "--trainer.max_epochs=1", "--test_after_fit=false"],
        tmp_path,
    )
    ckpt = next(tmp_path.rglob("best-*.ckpt"))
    common = [*logger, f"--ckpt_path={ckpt}", "--model.init_args.detector_cache=false"]
    _run(
        "evaluate.py", [*common, "--trainer.devices=1", f"--ood_eval.output_dir={tmp_path / 'one'}"], tmp_path
    )
    _run(
        "evaluate.py",
        [
            *common,
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            f"--ood_eval.output_dir={tmp_path / 'two'}",
        ],
        tmp_path,
    )
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert one.keys() == two.keys()
    for key, row in one.items():
        # digits_tiny: 101 ID test images, 50 + 37 OOD: no size divides by 2 x batch size, so padding
        # duplicates would change these counts and the metrics.
        assert (two[key]["n_id"], two[key]["n_ood"]) == (row["n_id"], row["n_ood"])
        assert two[key]["id_acc"] == pytest.approx(row["id_acc"], abs=1e-12)
        for metric in METRIC_KEYS:
            assert two[key][metric] == pytest.approx(row[metric], abs=1e-9), (key, metric)
    assert one[("msp", "gaussian")]["n_ood"] == 37 and one[("msp", "gaussian")]["n_id"] == 101


@pytest.mark.slow
def test_ddp_training_runs_and_tests(tmp_path):
    _run(
        "train.py",
        [
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--ood_eval.output_dir={tmp_path / 'out'}",
        ],
        tmp_path,
    )
    rows = _rows(tmp_path / "out")
    assert rows[("knn", "faces")]["n_ood"] == 50
