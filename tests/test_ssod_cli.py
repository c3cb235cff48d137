"""SSOD through the CLI: shipped configs, a fit -> test on tiny data with mask pictures, a 2-process DDP fit."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import FAST, csv_logger, eval_callback, rows_by_key, run_script

from lightning_ood.callbacks import AttentionMaps, SSODMasks
from lightning_ood.cli import OODCLI, train
from lightning_ood.methods import SSOD, Classifier

NO_LOGGER = ["--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=1"]
#: The 28 px model config, narrowed to run in seconds on digits_tiny (16 px: a 4x4 map); two detectors.
TINY_SSOD = [
    "--data",
    "configs/data/digits_tiny.yaml",
    "--model",
    "configs/model/ssod_resnet10t_os4.yaml",
    "--model.init_args.img_size=16",
    "--model.init_args.backbone_kwargs={channels: [8, 8, 16, 16]}",
    "--model.init_args.detectors=[{class_path: lightning_ood.detectors.MSP}, "
    "{class_path: lightning_ood.detectors.Mahalanobis}]",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--ood_eval.print_table=false",
    "--ood_eval.plots=false",
]
SCORES = {"msp", "mahalanobis", "ssod", "ood_head"}


def _model_section(path: str) -> dict:
    text = yaml.safe_load(Path(path).read_text())
    model = text["model"]
    return yaml.safe_load((Path(path).parent / model).read_text()) if isinstance(model, str) else model


def test_the_baseline_config_differs_from_ssod_only_in_the_method():
    ssod, base = (
        yaml.safe_load(Path(p).read_text())
        for p in ("configs/ssod_fashionmnist.yaml", "configs/ssod_baseline_fashionmnist.yaml")
    )
    assert ssod["data"] == base["data"] and ssod["seed_everything"] == base["seed_everything"]
    for key in ("accelerator", "devices", "max_epochs"):
        assert ssod["trainer"][key] == base["trainer"][key]
    assert ssod["trainer"]["max_epochs"] >= 5
    m_ssod = _model_section("configs/ssod_fashionmnist.yaml")["init_args"]
    m_base = _model_section("configs/ssod_baseline_fashionmnist.yaml")["init_args"]
    shared = ("backbone", "optimizer", "scheduler", "scheduler_interval", "pretrained")
    assert {k: m_ssod[k] for k in shared} == {k: m_base[k] for k in shared}
    cli = OODCLI(args=["--config", "configs/ssod_fashionmnist.yaml", *NO_LOGGER])
    assert isinstance(cli.model, SSOD) and cli.model.map_size == (7, 7)  # 28 px -> 7x7
    assert (cli.model.hparams.gamma, cli.model.hparams.alpha) == (0.95, 1.0)
    assert any(isinstance(cb, SSODMasks) for cb in cli.trainer.callbacks)
    base_cli = OODCLI(args=["--config", "configs/ssod_baseline_fashionmnist.yaml", *NO_LOGGER])
    assert isinstance(base_cli.model, Classifier)
    assert str(base_cli.model.net.model) == str(cli.model.net.backbone.model)  # the very same network


@pytest.mark.parametrize(
    ("args", "side"),
    [
        (["--data", "configs/data/cifar10.yaml", "--model", "configs/model/ssod_resnet18_os4.yaml"], 8),
        (
            [
                "--data",
                "configs/data/cifar10.yaml",
                "--model",
                "configs/model/ssod_resnet50.yaml",
                "--trainer",
                "configs/trainer/gpu_multi.yaml",
                "--trainer.callbacks=[{class_path: lightning_ood.callbacks.SSODMasks}]",
            ],
            7,
        ),
    ],
    ids=["cifar_32px", "resnet50_224px_gpu_multi"],
)
def test_larger_configs_instantiate_with_big_enough_maps(args, side):
    cli = OODCLI(args=[*args, "--model.init_args.pretrained=false", *NO_LOGGER])
    assert isinstance(cli.model, SSOD) and cli.model.map_size == (side, side)
    if "configs/trainer/gpu_multi.yaml" in args:  # its OODformer attention maps replaced by SSOD's masks
        assert [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, (SSODMasks, AttentionMaps))] == [
            SSODMasks
        ]


@pytest.mark.slow
def test_fit_and_test_end_to_end_with_mask_pictures(tmp_path):
    args = [*TINY_SSOD, "--trainer.accelerator=cpu", "--trainer.devices=1", *csv_logger(tmp_path)]
    cli = train(
        [*args, "--trainer.log_every_n_steps=1", "--trainer.callbacks+=lightning_ood.callbacks.SSODMasks"]
    )
    assert cli.trainer.checkpoint_callback.best_model_path  # chosen by val/acc
    run = eval_callback(cli).output_path
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/ood_loss", "train/n_id_locations", "train/n_ood_locations"):
        assert {f"{key}_step", f"{key}_epoch"} <= set(header), key  # per batch and per epoch
    assert "val/acc" in header
    rows = rows_by_key(cli)
    assert {d for d, _ in rows} == SCORES
    assert {s for _, s in rows} == {"faces", "gaussian", "near", "far", "all"}
    assert all(np.isfinite(r["auroc"]) and r["id_acc"] is not None for r in rows.values())
    plots = {p.name for p in (run / "plots").glob("ssod_masks_*.png")}
    assert plots == {f"ssod_masks_{s}.png" for s in ("train", "id", "faces", "gaussian")}


@pytest.mark.slow
def test_mask_pictures_reach_wandb(tmp_path):
    args = [*TINY_SSOD, "--trainer.accelerator=cpu", "--trainer.devices=1"]
    args += [
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=lightning_ood.callbacks.SSODMasks",
    ]
    cli = train(args)
    run = cli.trainer.logger.experiment
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    keys = set(run.summary.keys())
    assert {"test/ssod_masks", "train/n_id_locations_epoch", "test/gaussian/ssod/auroc"} <= keys
    assert run.config["gamma"] == 0.95 and run.config["method"] == "ssod"
    run.finish()


@pytest.mark.slow
def test_the_map_size_is_checked_for_the_data_image_size(tmp_path):
    args = [*TINY_SSOD, *NO_LOGGER, "--model.init_args.backbone=resnet10t", "--model.init_args.img_size=null"]
    with pytest.raises(ValueError, match=r"1x1 map on 16 px inputs \(data.image_size\)"):
        train([*args, f"--trainer.default_root_dir={tmp_path}"])


def test_the_mask_callback_refuses_other_methods(tmp_path):
    args = ["--data", "configs/data/digits_tiny.yaml", "--model", "configs/model/classifier_tiny.yaml", *FAST]
    args += [
        "--trainer.logger=false",
        "--trainer.fast_dev_run=true",
        "--trainer.callbacks+=lightning_ood.callbacks.SSODMasks",
    ]
    with pytest.raises(TypeError, match="location_maps"):
        train([*args, f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.slow
def test_two_process_ddp_fit_and_test(tmp_path):
    out = tmp_path / "out"
    run_script(
        "train.py",
        [
            *TINY_SSOD,
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--ood_eval.output_dir={out}",
        ],
    )
    rows = rows_by_key(out)
    assert {d for d, _ in rows} == SCORES
    assert (
        rows[("ssod", "gaussian")]["n_ood"] == 37 and rows[("ssod", "gaussian")]["n_id"] == 101
    )  # each once
