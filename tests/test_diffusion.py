"""The diffusion model trains through the CLI (best checkpoint by val/loss, sample grids) and DiffGuard evaluates
through the CLI on its checkpoint, beside the classifier's library detectors."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import FAST, csv_logger, rows_by_key

from lightning_ood.cli import evaluate, train
from lightning_ood.frozen import save_method
from lightning_ood.methods import Classifier, DiffusionModel

DATA = ["--data", "configs/data/digits_tiny.yaml"]


@pytest.mark.slow
def test_diffusion_trains_then_diffguard_evaluates_through_the_cli(tmp_path):
    cli = train(
        [
            *DATA, "--model", "configs/model/diffusion_tiny.yaml", *FAST, *csv_logger(tmp_path / "diffusion"),
            "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--test_after_fit=false", "--trainer.callbacks+=lightning_ood.callbacks.DiffusionSamples",
            "--trainer.callbacks.init_args.every_n_epochs=1", "--trainer.callbacks.init_args.steps=2",
            "--trainer.callbacks.init_args.per_class=1",
        ]
    )  # fmt: skip
    model, checkpoint = cli.model, cli.trainer.checkpoint_callback
    assert isinstance(model, DiffusionModel) and checkpoint.monitor == "val/loss" and checkpoint.mode == "min"
    assert checkpoint.best_model_path and torch.isfinite(checkpoint.best_model_score)
    samples = sorted((tmp_path / "diffusion").rglob("samples/epoch_*.png"))
    assert [p.name for p in samples] == ["epoch_000.png", "epoch_001.png"]
    state = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    ema = {k for k in state if k.startswith("ema_unet.")}
    assert ema and {k.replace("ema_unet.", "unet.", 1) for k in ema} <= set(state)
    # the moving average moved away from the initial weights but is not the trained weights either
    assert any(not torch.equal(state[k], state[k.replace("ema_unet.", "unet.", 1)]) for k in ema)

    torch.manual_seed(0)
    classifier = save_method(
        Classifier(backbone="test_resnet", num_classes=10, in_chans=1), tmp_path / "classifier.ckpt"
    )
    out = tmp_path / "diffguard"
    ev = evaluate(
        [
            *DATA, *FAST, *csv_logger(out), "--model=lightning_ood.methods.DiffGuard",
            f"--model.init_args.classifier={classifier}", f"--model.init_args.diffusion={checkpoint.best_model_path}",
            "--model.init_args.steps=2", "--model.init_args.combine_val_images=20",
            "--trainer.callbacks+=lightning_ood.callbacks.Regenerations",
            "--trainer.callbacks.init_args.num_images=2", f"--trainer.callbacks.init_args.output_dir={out}",
        ]
    )  # fmt: skip
    rows = rows_by_key(ev)
    for score in (
        "msp",
        "energy",
        "mahalanobis",
        "diffguard_logits",
        "diffguard_ssim",
        "diffguard_logits_plus_energy",
    ):
        assert 0.0 <= rows[(score, "all")]["auroc"] <= 1.0, score
    assert rows[("diffguard_l2", "faces")]["n_id"] == 101  # every ID test image scored once
    assert (out / "plots" / "regenerations.png").is_file()
    # the frozen sub-models keep their own hyperparameters when loaded inside the CLI's instantiation
    assert ev.model.classifier.hparams.backbone == "test_resnet"
    assert ev.model.run_config["backbone"] == "test_resnet+unet8-16"
    assert ev.model.standardiser.fitted and int(ev.model.standardiser.moments[0, 0]) == 20


def test_denoising_error_is_batch_independent():
    model = DiffusionModel(
        num_classes=3, in_chans=1, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
        num_train_timesteps=50, score_timesteps=(5, 30), input_mean=[0.5], input_std=[0.5],
    ).eval()  # fmt: skip
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        batched = model.native_scores(model.forward_outputs(x), x)["denoising_error"]
        single = torch.cat([model.forward_outputs(x[i : i + 1]).extras["denoising_error"] for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-7)
    assert not model.classifies and model.provides == frozenset({"inputs"})


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="label_dropout"):
        DiffusionModel(label_dropout=1.0)
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        DiffusionModel(block_out_channels=(12, 24), norm_num_groups=8)
