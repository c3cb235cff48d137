"""One-line CLI errors that name the fix: unknown options (no prefix matching), unknown classes and keys with
the nearest valid names, no top-level --optimizer; a run without a logger writes into a fresh folder."""

from pathlib import Path

import pytest
from cli_helpers import TINY

from lightning_ood.cli import OODCLI


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        OODCLI(args=[*TINY, "--trainer.logger=false", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, not the usage dump
    return err


def test_no_prefix_matching_of_options(capsys):
    assert "unknown option --trainer.max_epoch; did you mean --trainer.max_epochs" in _error(
        capsys, "--trainer.max_epoch=1"
    )


def test_unknown_detector_class_and_key_name_the_nearest(capsys):
    err = _error(capsys, "--model.init_args.detectors=[{class_path: lightning_ood.detectors.KNNN}]")
    assert "no class lightning_ood.detectors.KNNN; did you mean lightning_ood.detectors.KNN" in err
    err = _error(
        capsys, "--model.init_args.detectors=[{class_path: lightning_ood.detectors.KNN, init_args: {kk: 3}}]"
    )
    assert "lightning_ood.detectors.KNN has no option 'kk'; did you mean k?" in err
    err = _error(capsys, "--model.init_args.no_such_option=1")
    assert "Classifier has no option 'no_such_option'; valid: backbone," in err


def test_top_level_optimizer_is_refused_with_the_reason(tmp_path):
    with pytest.raises(
        ValueError, match=r"set --model.init_args.optimizer .*replace the configured optimiser"
    ):
        OODCLI(args=[*TINY, "--trainer.logger=false", "--optimizer=Adam"])
    # a config saved by 0.1 holds `optimizer: null` and `lr_scheduler: null`: still accepted
    old = tmp_path / "config.yaml"
    old.write_text("optimizer: null\nlr_scheduler: null\n")
    assert OODCLI(args=["--config", str(old), *TINY, "--trainer.logger=false"]).config.optimizer is None


def test_without_a_logger_each_run_gets_its_own_folder_under_logs():
    from lightning_ood import cli

    dirs = {OODCLI(args=[*TINY, "--trainer.logger=false"]).trainer.default_root_dir for _ in range(2)}
    assert len(dirs) == 2 and all(
        Path(d).parent == Path(cli.NO_LOGGER_ROOT) and Path(d).name.startswith("run-") for d in dirs
    )  # ./logs outside the tests
