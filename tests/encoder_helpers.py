"""Tiny frozen encoders built in the tests (no downloads): random timm and OpenCLIP weights saved to files, and a
lightning-ood classifier checkpoint, each loaded through the real loading path."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch import Tensor

from lightning_ood.nets.encoders import Encoder, InputSpec

#: The name the tiny OpenCLIP architecture is registered under (``open_clip.add_model_config``).
TINY_CLIP = "lightning-ood-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
#: ``test_vit`` at 32 px (a 2 x 2 patch grid): fast enough for end-to-end runs.
TIMM_KWARGS = {"img_size": 32}


def timm_weights(folder: Path, name: str = "test_vit", **kwargs: object) -> Path:
    """A randomly initialised timm model's weights (with an ImageNet-sized head, as real weights have)."""
    torch.manual_seed(0)
    path = folder / f"{name}.pth"
    torch.save(timm.create_model(name, num_classes=1000, **kwargs).state_dict(), path)
    return path


def clip_checkpoint(folder: Path) -> Path:
    """Register the tiny OpenCLIP architecture and save random weights for it."""
    import open_clip

    config = folder / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    path = folder / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), path)
    return path


def classifier_checkpoint(folder: Path) -> Path:
    """A lightning-ood Classifier (timm ``test_resnet``) trained for 2 steps on digits_tiny, via train.py's CLI."""
    from cli_helpers import FAST, TINY, csv_logger

    from lightning_ood.cli import train

    cli = train(
        [
            *TINY,
            *FAST,
            *csv_logger(folder),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--test_after_fit=false",
        ]
    )
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def encoder_override(kind: str, path: Path) -> str:
    """A ``--model.init_args.encoder=...`` value that swaps a config's encoder for a tiny one of ``kind``."""
    init: dict[str, object]  # every argument, so that none of the config's encoder settings carries over
    if kind == "timm":
        init = {"name": "test_vit", "pretrained": False, "weights_path": str(path), "image_size": None,
                "model_kwargs": TIMM_KWARGS}  # fmt: skip
        class_path = "lightning_ood.nets.encoders.TimmEncoder"
    elif kind == "clip":
        init = {"model_name": TINY_CLIP, "checkpoint": str(path), "pretrained": None, "preprocess": None}
        class_path = "lightning_ood.nets.clip.ClipEncoder"
    else:
        init = {"checkpoint": str(path), "mean": None, "std": None}
        class_path = "lightning_ood.nets.encoders.CheckpointEncoder"
    return "--model.init_args.encoder=" + json.dumps({"class_path": class_path, "init_args": init})


def frozen_encoder_kind(config: dict) -> str | None:
    """``"timm"``, ``"clip"`` or ``"checkpoint"`` for a FrozenEncoder model config (a model YAML or a full config's
    ``model``), else ``None``."""
    if not isinstance(config, dict) or not str(config.get("class_path", "")).endswith("FrozenEncoder"):
        return None
    encoder = str(config["init_args"]["encoder"]["class_path"])
    return (
        "clip"
        if encoder.endswith("ClipEncoder")
        else "timm"
        if encoder.endswith("TimmEncoder")
        else "checkpoint"
    )


#: The session fixture (tests/conftest.py) that gives a tiny encoder of each kind.
ENCODER_FIXTURES = {
    "timm": "timm_weights_file",
    "clip": "clip_checkpoint_file",
    "checkpoint": "classifier_ckpt",
}


class SpyEncoder(Encoder):
    """Records every input it receives; embeds by channel means (``[B, C]``), so features are checkable."""

    def __init__(
        self, size: int = 8, mean: float = 0.25, std: float = 0.125, channels: int = 3, crop_pct: float = 1.0
    ) -> None:
        super().__init__()
        self.name, self.source = "spy", None
        self.input_spec = InputSpec(size=size, mean=(mean,) * channels, std=(std,) * channels,
                                    crop_pct=crop_pct, interpolation="bilinear", channels=channels)  # fmt: skip
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().cpu())
        return self.scale * x.mean(dim=(2, 3))
