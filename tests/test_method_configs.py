"""Every shipped method config trains and tests through the CLI on tiny data (sizes shrunk, settings kept)."""

from pathlib import Path

import pytest
import yaml
from cli_helpers import FAST, csv_logger, rows_by_key
from encoder_helpers import ENCODER_FIXTURES, encoder_override, frozen_encoder_kind

from lightning_ood.cli import evaluate, train

MODELS = sorted((Path(__file__).resolve().parents[1] / "configs" / "model").glob("*.yaml"))
#: Shrink each config to seconds on 16 px digits; everything else (optimiser, scheduler, detectors) is the config's.
SHRINK = {
    "oodformer": [
        "--model.init_args.img_size=16",
        "--model.init_args.patch_size=4",
        "--model.init_args.resize_input=false",
        "--model.init_args.backbone_kwargs={embed_dim: 16, depth: 1, num_heads: 2}",
        "--model.init_args.scheduler.init_args.warmup_steps=1",
    ],
    "classifier": [],
    "diffusion_tiny": [],
    "diffusion_unet": [  # three levels on 16 px (16, 8, 4), narrow
        "--model.init_args.sample_size=16",
        "--model.init_args.block_out_channels=[8, 16, 16]",
        "--model.init_args.scheduler.init_args.warmup_steps=1",
    ],
    # ResNet-50 at 16 px: one narrow block per stage and output_stride 8 (a 2x2 map instead of 1x1)
    "ssod_resnet50": [
        "--model.init_args.img_size=16",
        "--model.init_args.backbone_kwargs={layers: [1, 1, 1, 1], channels: [8, 8, 16, 16], output_stride: 8}",
        "--model.init_args.ood_hidden=8",
        "--model.init_args.scheduler.init_args.warmup_steps=1",
    ],
    "heatmap": ["--data.init_args.train_transforms=[]"],  # outlier targets need outliers as stored
    "ssod_reference": [
        "--model.init_args.img_size=16"
    ],  # resnet10t_os4_half fixes its (already narrow) widths
    "ssod": [  # the stride-4 ResNets: a 4x4 map on 16 px
        "--model.init_args.img_size=16",
        "--model.init_args.backbone_kwargs={channels: [8, 8, 16, 16]}",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("config", [m for m in MODELS if m.stem.startswith("frozen")], ids=lambda p: p.stem)
def test_frozen_encoder_config_evaluates_without_training(
    config: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A frozen encoder is not trained: evaluate.py tests it as configured, here with a tiny encoder of the same
    kind (timm / OpenCLIP) swapped in for the pretrained one."""
    kind = frozen_encoder_kind(yaml.safe_load(config.read_text()))
    if kind == "clip":
        pytest.importorskip("open_clip")
    tiny = encoder_override(kind, request.getfixturevalue(ENCODER_FIXTURES[kind]))
    cli = evaluate(
        [
            "--data",
            "configs/data/digits_tiny.yaml",
            "--model",
            str(config),
            tiny,
            *FAST,
            *csv_logger(tmp_path),
        ]
    )
    rows = rows_by_key(cli)
    assert {d for d, _ in rows} == set(cli.model.score_names)
    assert rows[(cli.model.score_names[0], "faces")]["id_acc"] is not None  # the linear probe classifies


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [m for m in MODELS if not m.stem.startswith("frozen")], ids=lambda p: p.stem
)
def test_method_config_fits_and_tests(config: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    shrink = next(v for k, v in SHRINK.items() if config.stem.startswith(k))
    if config.stem.startswith("heatmap"):  # a decoder on a frozen classifier: the tiny one
        shrink = [*shrink, f"--model.init_args.classifier_ckpt={request.getfixturevalue('classifier_ckpt')}"]
    cli = train(
        [
            "--data",
            "configs/data/digits_tiny.yaml",
            "--model",
            str(config),
            *(["--model.init_args.pretrained=false"] if "pretrained:" in config.read_text() else []),
            *shrink,
            *FAST,
            *csv_logger(tmp_path),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    assert cli.trainer.checkpoint_callback.best_model_path  # the best checkpoint by the method's val/acc
    rows = rows_by_key(cli)
    assert {s for _, s in rows} == {"faces", "gaussian", "near", "far", "all"}
    assert {d for d, _ in rows} == set(cli.model.score_names)
    assert all(row["n_ood"] in (50, 37, 87) for row in rows.values())
