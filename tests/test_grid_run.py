"""``python -m lightning_ood.grid``: expansion and its errors, a tiny grid end to end on submitit's local executor
with 2 processes (a dependent run, a failing run that stops only what depends on it, resume), and SLURM
submission with ``afterok`` dependencies (``sbatch`` replaced by a script that records what it is given)."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from lightning_ood.grid import __main__ as grid_cli
from lightning_ood.grid.spec import expand, load_grid

FAST = [
    "--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1", "--trainer.enable_model_summary=false", "--ood_eval.plots=false",
]  # fmt: skip
TINY = ["--data", "configs/data/digits_tiny.yaml", "--model", "configs/model/classifier_tiny.yaml"]
COMMON = [
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir={dir}",
    "--trainer.logger.name=log", "--trainer.logger.version=0", "--trainer.enable_progress_bar=false",
]  # fmt: skip


def _write(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), **grid}, sort_keys=False))
    return path


def tiny_grid(tmp_path: Path) -> Path:
    return _write(tmp_path, {
        "benchmarks": ["digits"],
        "seeds": [0, 1],
        "common_args": COMMON,
        "eval_args": ["--ood_eval.output_dir={dir}", "--ood_eval.print_table=false"],
        "methods": {
            "classifier": {"args": [*TINY, "--seed_everything", "{seed}", *FAST]},
            "retest": {  # the seed-0 classifier tested again from its best checkpoint
                "entry": "evaluate", "seeds": [0], "needs": {"clf": "classifier"},
                "args": [*TINY, "--ckpt_path={clf}", *FAST],
            },
            "broken": {"seeds": [0], "args": ["--config", "configs/no_such_config.yaml"]},
            "finished": {"seeds": [0], "args": [*TINY]},
            "after_broken": {"seeds": [0], "needs": {"up": "broken"}, "args": ["--ckpt_path={up}"]},
        },
    })  # fmt: skip


def _started(log: Path) -> datetime:
    return datetime.fromisoformat(log.read_text().splitlines()[0].removeprefix("# started "))


@pytest.mark.slow
def test_tiny_grid_on_two_local_processes_with_a_failure_and_resume(tmp_path, capsys, monkeypatch):
    """Two classifiers at once, then a run that needs one of them beside a run that fails; a finished run is
    skipped and a run cut short starts again from a clean directory."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = tiny_grid(tmp_path)
    out = tmp_path / "out" / "digits"
    clf = [out / "classifier" / f"seed{k}" for k in (0, 1)]
    finished = out / "finished" / "seed0"  # a run finished earlier: never started again
    finished.mkdir(parents=True)
    (finished / "ood_results.json").write_text("{}")
    clf[1].mkdir(parents=True)
    (clf[1] / "stale.txt").write_text("left by a run that was cut short (no ood_results.json)")
    with pytest.raises(SystemExit) as exit_info:
        grid_cli.main([str(grid), "--parallel", "2"])
    assert exit_info.value.code == 1
    summary = capsys.readouterr().out
    assert "3 done, 1 skipped (already finished), 1 failed, 1 not started" in summary
    log = out / "broken" / "seed0" / "run.log"
    assert f"FAILED  digits/broken/seed0: digits/broken/seed0 exited with code 2; see {log}" in summary
    assert "BLOCKED digits/after_broken/seed0: upstream digits/broken/seed0 did not finish" in summary
    assert "config files not found" in log.read_text() and not (out / "after_broken" / "seed0").exists()
    assert (finished / "ood_results.json").read_text() == "{}" and not (finished / "run.log").exists()
    assert not (clf[1] / "stale.txt").exists()
    for d in (*clf, out / "retest" / "seed0"):
        assert (d / "ood_results.json").is_file() and (d / "wall_s").is_file() and (d / "run.log").is_file()
    ends = [datetime.fromtimestamp((d / "ood_results.json").stat().st_mtime) for d in clf]
    starts = [_started(d / "run.log") for d in clf]
    assert starts[0] < ends[1] and starts[1] < ends[0]  # the two classifiers ran at the same time
    retest = (out / "retest" / "seed0" / "run.log").read_text()
    assert _started(out / "retest" / "seed0" / "run.log") > ends[0]  # the dependent waited for its upstream
    assert "--ckpt_path=" + str(clf[0] / "log" / "version_0" / "checkpoints" / "best-") in retest
    assert grid_cli.main([str(grid), "--methods", "retest", "classifier"]).skipped == [
        "digits/classifier/seed0", "digits/classifier/seed1", "digits/retest/seed0"
    ]  # fmt: skip


def test_dry_run_lists_runs_and_dependencies(tmp_path, capsys):
    grid_cli.main([str(tiny_grid(tmp_path)), "--dry-run"])
    text = capsys.readouterr().out
    assert "[to run] digits/retest/seed0  (retest, digits, seed 0)" in text
    assert f"needs {{clf}} = best checkpoint of {tmp_path}/out/digits/classifier/seed0" in text
    assert text.rstrip().endswith("6 runs, 6 to run")


def test_slurm_submission_chains_runs_with_afterok(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        f"#!{sys.executable}\nimport os, shutil, sys\n"
        f"n = len(os.listdir({str(tmp_path / 'sbatch')!r}))\n"
        f"shutil.copy(sys.argv[1], os.path.join({str(tmp_path / 'sbatch')!r}, str(n)))\n"
        "print(f'Submitted batch job {100 + n}')\n"
    )
    sbatch.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit looks for it to tell a SLURM machine
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "sbatch").mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    summary = grid_cli.main([str(tiny_grid(tmp_path)), "--executor", "slurm", "--partition", "gpu",
                             "--gpus-per-job", "1"])  # fmt: skip
    assert summary.submitted == {
        "digits/classifier/seed0": "100", "digits/classifier/seed1": "101", "digits/retest/seed0": "102",
        "digits/broken/seed0": "103", "digits/finished/seed0": "104", "digits/after_broken/seed0": "105",
    }  # fmt: skip
    scripts = [(tmp_path / "sbatch" / str(n)).read_text() for n in range(6)]
    assert all("#SBATCH --partition=gpu" in s and "#SBATCH --gpus-per-node=1" in s for s in scripts)
    assert "--dependency" not in scripts[0] + scripts[1] + scripts[3]
    assert (
        "#SBATCH --dependency=afterok:100" in scripts[2] and "#SBATCH --dependency=afterok:103" in scripts[5]
    )
    with pytest.raises(SystemExit, match="needs --partition"):
        grid_cli.main([str(tiny_grid(tmp_path)), "--executor", "slurm"])


@pytest.mark.parametrize(
    "methods, message",
    [
        ({"a": {"args": ["{nope}"]}}, "unknown placeholders \\['nope'\\]"),
        ({"a": {"entry": "fit"}}, "entry must be one of"),
        ({"a": {"argz": []}}, "unknown keys \\['argz'\\]"),
        ({"a": {"needs": {"x": "b"}, "args": ["{x}"]}}, "needs method 'b', which the grid does not define"),
        ({"a": {"needs": {"x": "b"}, "args": ["{x}"]}, "b": {"needs": {"y": "a"}, "args": ["{y}"]}}, "cycle"),
        ({"a": {"run_dir": "x"}, "b": {"run_dir": "x/{seed}"}}, "lies inside run directory"),
        ({"a": {"run_dir": "same"}, "b": {"run_dir": "same"}}, "is the run directory of two runs"),
        ({"a": {"needs": {"x": "b"}, "args": []}, "b": {}}, "no argument uses \\{x\\}"),
        ({"a": {"run_dir": "{gamma}"}}, "run_dir '\\{gamma\\}' has unknown placeholders"),
        ({"a": {"benchmarks": []}}, "has no benchmarks or no seeds"),
    ],
)
def test_bad_grids_are_named(tmp_path, methods, message):
    with pytest.raises(ValueError, match=message):
        expand({"benchmarks": ["d"], "seeds": [0], "methods": methods}, {}, tmp_path)


def test_variables_and_sweeps(tmp_path):
    path = _write(tmp_path, {
        "vars": {"lr": 0.1}, "benchmarks": ["d"], "seeds": [3],
        "methods": {"m": {"sweep": {"g": [1, 2], "a": ["x", "y"]}, "exclude": [{"g": 2, "a": "y"}],
                          "run_dir": "{method}/g{g}_{a}", "args": ["--lr={lr}", "--g={g}", "--literal={{k: 1}}"]}},
    })  # fmt: skip
    _, jobs = load_grid(path, {"lr": "0.5"})
    assert [j.name for j in jobs] == ["m/g1_x", "m/g1_y", "m/g2_x"]
    assert jobs[1].args == ("--lr=0.5", "--g=1", "--literal={k: 1}")
    with pytest.raises(ValueError, match="has no variable 'rate'"):
        load_grid(path, {"rate": "1"})
