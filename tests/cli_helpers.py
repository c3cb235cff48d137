"""Shared arguments and helpers of the end-to-end (CLI) tests."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from lightning_ood.callbacks import OODEvaluation
from lightning_ood.callbacks.results import read_results
from lightning_ood.cli import OODCLI

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "configs/data/digits_tiny.yaml", "--model", "configs/model/classifier_tiny.yaml"]
FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--ood_eval.plots=false",
    "--ood_eval.print_table=false",
]


def csv_logger(root: Path) -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        "--trainer.logger.name=run",
    ]


def eval_callback(cli: OODCLI) -> OODEvaluation:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, OODEvaluation))


def rows_by_key(cli_or_dir: OODCLI | Path) -> dict[tuple[str, str], dict]:
    """Result rows keyed by (score, set), from a finished CLI run or a result directory."""
    directory = eval_callback(cli_or_dir).output_path if isinstance(cli_or_dir, OODCLI) else cli_or_dir
    return {(r["detector"], r["set"]): r for r in read_results(directory / "ood_results.json")[1]}


def run_script(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``train.py`` / ``evaluate.py`` in a fresh process (tests/ importable, W&B offline, one thread)."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_wandb_offline_run(run_file: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """``({"name", "job_type", "group"}, config)`` of an offline W&B run, read back from its ``run-<id>.wandb``
    file (a LevelDB-style log of protobuf records; config = every config update replayed in order)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = run_file.read_bytes(), 32768, 7  # 7-byte file header: ":W&B", magic, version
    records, part = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            records.append(part)
            part = b""
    facts: dict[str, str] = {}
    config: dict[str, Any] = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            facts = {
                "name": record.run.display_name,
                "job_type": record.run.job_type,
                "group": record.run.run_group,
            }
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        else:
            continue
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return facts, config
