"""The method contract: a method without logits and with its own score, trained with outliers through Lightning,
its best checkpoint chosen by the loss it declares (tests/toy_method.py)."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_helpers import FAST, csv_logger, eval_callback, rows_by_key, run_script
from toy_method import ToyEncoder

from lightning_ood.cli import OODCLI, train
from lightning_ood.detectors import KNN, MSP
from lightning_ood.metrics import METRIC_KEYS

DATA = ["--data", "configs/data/digits_tiny.yaml"]
TOY = [*DATA, "--model", "toy_method.ToyEncoder"]


def test_logit_detectors_refuse_a_method_without_logits():
    with pytest.raises(ValueError, match=r"'msp'.*needs \['logits'\]"):
        ToyEncoder(detectors=[MSP()])
    defaults = set(ToyEncoder().detectors)
    assert {"knn", "mahalanobis", "rmd", "class_mean_cosine"} <= defaults
    assert not defaults & {"msp", "energy", "max_logit", "vim", "react", "ash", "gen", "entropy"}


def test_detector_named_like_a_native_score_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"detector 'feature_norm' \(KNN\).*ToyEncoder's own score"):
        ToyEncoder(detectors=[KNN(name="feature_norm")])


def test_checkpoint_monitor_follows_the_method_unless_configured():
    toy = OODCLI(args=[*TOY, "--trainer.logger=false", *FAST])
    assert (toy.trainer.checkpoint_callback.monitor, toy.trainer.checkpoint_callback.mode) == (
        "val/loss",
        "min",
    )
    clf = OODCLI(
        args=[*DATA, "--model", "configs/model/classifier_tiny.yaml", "--trainer.logger=false", *FAST]
    )
    assert (clf.trainer.checkpoint_callback.monitor, clf.trainer.checkpoint_callback.mode) == (
        "val/acc",
        "max",
    )
    own = OODCLI(
        args=[
            *TOY,
            "--trainer.logger=false",
            *FAST,
            "--checkpoint.monitor=train/loss_epoch",
            "--checkpoint.mode=max",
        ]
    )
    assert (own.trainer.checkpoint_callback.monitor, own.trainer.checkpoint_callback.mode) == (
        "train/loss_epoch",
        "max",
    )


def test_toy_method_trains_tests_and_writes_results_and_wandb(tmp_path):
    cli = train(
        [
            *TOY,
            *FAST,
            "--trainer.max_epochs=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--checkpoint.save_top_k=-1",
        ]
    )
    ckpt = cli.trainer.checkpoint_callback
    assert ckpt.monitor == "val/loss" and Path(ckpt.best_model_path).is_file()
    losses = {Path(p).name: float(v) for p, v in ckpt.best_k_models.items()}
    assert Path(ckpt.best_model_path).name == min(losses, key=losses.get)  # the lowest validation loss
    state = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("detectors.")]
    rows = rows_by_key(cli)
    scores = {d for d, _ in rows}
    assert "feature_norm" in scores and "knn" in scores and "msp" not in scores
    row = rows[("feature_norm", "gaussian")]
    assert row["id_acc"] is None and row["n_id"] == 101 and row["n_ood"] == 37
    assert row["method"] == "toy_encoder" and all(0 <= row[k] <= 1 for k in METRIC_KEYS)
    out = eval_callback(cli).output_path
    assert "| - |" in (out / "ood_results.md").read_text()  # no accuracy for a method that does not classify
    run = cli.trainer.logger.experiment
    summary = set(run.summary.keys())
    assert "test/gaussian/feature_norm/auroc" in summary and "test/far/knn/auroc" in summary
    assert "test/id/acc" not in summary
    assert run.config["method"] == "toy_encoder" and torch.__version__.startswith(
        run.config["environment"]["torch"]
    )
    run.finish()


def _record(tmp_path: Path, devices: int) -> list[dict]:
    record = tmp_path / f"record{devices}"
    record.mkdir()
    args = [
        *DATA,
        "--model=toy_method.RecordingToy",
        f"--model.init_args.record_dir={record}",
        "--data.init_args.aux_transforms=[]",  # un-augmented outliers: each image is recognisable by its bytes
        "--data.init_args.aux_batch_size=16",
        *FAST[:1],
        *FAST[2:],
        f"--trainer.devices={devices}",
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
        *csv_logger(tmp_path / f"logs{devices}"),
    ]
    if devices == 1:
        train(args)
    else:
        run_script("train.py", [*args, "--trainer.strategy=ddp"])
    return [json.loads((record / f"rank{r}_epoch0.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_outliers_reach_training_step_sharded_on_one_and_two_processes(tmp_path):
    """digits_tiny: 256 ID train images in batches of 32, 64 aux outliers drawn 16 per step."""
    one = _record(tmp_path, 1)[0]
    assert one["id_sizes"] == [32] * 8 and one["outlier_sizes"] == [16] * 8  # the ID data defines the epoch
    assert set(one["targets"]) == {-1}
    counts = Counter(one["outlier_hashes"])
    assert len(counts) == 64 and set(counts.values()) == {2}  # 128 draws cycle the 64 outliers twice

    two = _record(tmp_path, 2)
    for rank in two:  # 128 ID images per rank: 4 steps, each with 16 outliers
        assert (
            rank["id_sizes"] == [32] * 4
            and rank["outlier_sizes"] == [16] * 4
            and set(rank["targets"]) == {-1}
        )
    assert two[0]["outlier_hashes"] != two[1]["outlier_hashes"]  # each rank gets its own draws
    union = Counter(two[0]["outlier_hashes"] + two[1]["outlier_hashes"])
    assert (
        union == counts
    )  # together the ranks draw each outlier as often as one process: sharded, not copied


def test_a_method_without_outliers_never_builds_them():
    cli = OODCLI(
        args=[*DATA, "--model", "configs/model/classifier_tiny.yaml", "--trainer.logger=false", *FAST]
    )
    dm = cli.datamodule
    dm.trainer = cli.trainer
    cli.trainer.strategy.connect(cli.model)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), torch.utils.data.DataLoader)
    assert "aux" not in dm._splits


def test_without_a_validation_metric_the_last_checkpoint_is_tested(tmp_path, caplog):
    with caplog.at_level("INFO"):
        cli = train(
            [
                *DATA,
                "--model=toy_method.UnmonitoredToy",
                *FAST,
                *csv_logger(tmp_path / "a"),
                "--trainer.max_epochs=1",
            ]
        )
    assert cli.trainer.checkpoint_callback.monitor is None
    assert (
        "declares no validation metric to choose a best checkpoint by: testing the last checkpoint"
        in caplog.text
    )
    assert rows_by_key(cli)

    with pytest.warns(UserWarning, match=r"No best checkpoint by 'val/acc'.*Testing the last checkpoint"):
        clf = train(
            [
                *DATA,
                "--model",
                "configs/model/classifier_tiny.yaml",
                *FAST,
                *csv_logger(tmp_path / "b"),
                "--trainer.max_epochs=1",
                "--data.init_args.val_fraction=0",
            ]
        )
    assert clf.trainer.ckpt_path.endswith("last.ckpt") and rows_by_key(clf)
