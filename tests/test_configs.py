"""Every shipped YAML config parses and instantiates (no network: pretrained weights are switched off, frozen
encoders are swapped for tiny ones of the same kind)."""

from pathlib import Path

import pytest
import yaml
from encoder_helpers import ENCODER_FIXTURES, encoder_override, frozen_encoder_kind

from lightning_ood.cli import OODCLI
from lightning_ood.frozen import save_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = [
    "--data",
    "configs/data/digits_tiny.yaml",
    "--model",
    "configs/model/classifier_tiny.yaml",
    "--trainer.logger=false",
]
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1"]


def _no_pretrained(path: Path, group: str) -> list[str]:
    text = yaml.safe_load(path.read_text()) or {}
    model = text.get("model", text) if group != "full" else text.get("model", {})
    init = model.get("init_args", {}) if isinstance(model, dict) else {}
    return ["--model.init_args.pretrained=false"] if "pretrained" in init else []


def _tiny_encoder(path: Path, group: str, request: pytest.FixtureRequest) -> list[str]:
    """A frozen-encoder config names weights that do not exist here: swap in a tiny encoder of the same kind."""
    text = yaml.safe_load(path.read_text()) or {}
    kind = frozen_encoder_kind(text.get("model", {}) if group == "full" else text)
    if kind is None:
        return []
    if kind == "clip":
        pytest.importorskip("open_clip")
    return [encoder_override(kind, request.getfixturevalue(ENCODER_FIXTURES[kind]))]


def _heatmap_classifier(path: Path, group: str, request: pytest.FixtureRequest) -> list[str]:
    """A heatmap config names the classifier checkpoint it decodes: point it at the tiny one (grey, 10 classes;
    the RGB CIFAR-10 config gets grey data so that the check of channels passes)."""
    if group not in ("full", "model") or not path.stem.startswith("heatmap"):
        return []
    args = [f"--model.init_args.classifier_ckpt={request.getfixturevalue('classifier_ckpt')}"]
    grey = ["--data.init_args.channels=1", "--data.init_args.mean=0.5", "--data.init_args.std=0.5"]
    return args + (grey if "cifar" in path.stem else [])


@pytest.fixture(scope="module")
def diffguard_parts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A DiffGuard config names checkpoints that do not exist here: a tiny 10-class classifier and diffusion model."""
    from lightning_ood.methods import Classifier, DiffusionModel

    root = tmp_path_factory.mktemp("diffguard_parts")
    classifier = save_method(
        Classifier(backbone="test_resnet", num_classes=10, in_chans=1), root / "classifier.ckpt"
    )
    diffusion = DiffusionModel(
        num_classes=10, in_chans=1, sample_size=16, block_out_channels=(8, 16), norm_num_groups=4
    )
    return [
        f"--model.init_args.classifier={classifier}",
        f"--model.init_args.diffusion={save_method(diffusion, root / 'diffusion.ckpt')}",
    ]


def _tiny_diffguard(path: Path, group: str, request: pytest.FixtureRequest) -> list[str]:
    text = yaml.safe_load(path.read_text()) or {}
    model = text.get("model", {}) if group == "full" else text
    if not isinstance(model, dict) or not str(model.get("class_path", "")).endswith("DiffGuard"):
        return []
    return request.getfixturevalue("diffguard_parts")


def _cases() -> list[tuple[str, Path]]:
    cases = [("full", p) for p in sorted(CONFIGS.glob("*.yaml"))]
    for group in ("data", "model", "trainer", "detector_search"):
        cases += [(group, p) for p in sorted((CONFIGS / group).glob("*.yaml"))]
    return cases


@pytest.mark.parametrize(("group", "path"), _cases(), ids=lambda c: c if isinstance(c, str) else c.name)
def test_config_instantiates(group: str, path: Path, request: pytest.FixtureRequest) -> None:
    if group == "full":
        args = ["--config", str(path), "--trainer.logger=false", *CPU, *_no_pretrained(path, group)]
    elif group == "trainer":
        args = [*BASE, "--trainer", str(path), "--trainer.logger=false", *CPU]
    else:
        args = [*BASE, f"--{group}", str(path), *CPU, *_no_pretrained(path, group)]
    args += _tiny_encoder(path, group, request) if group in ("full", "model") else []
    args += _heatmap_classifier(path, group, request)
    args += _tiny_diffguard(path, group, request) if group in ("full", "model") else []
    cli = OODCLI(args=args)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes


def test_every_detector_config_lists_every_detector_and_instantiates() -> None:
    """``configs/detectors/every.yaml`` (the results page's every-detector evaluation) names every exported
    detector class and builds on a classifier: each detector accepts what the method provides."""
    from lightning_ood import detectors

    cli = OODCLI(args=[*BASE, "--config", str(CONFIGS / "detectors" / "every.yaml"), *CPU])
    classes = {type(d).__name__ for d in cli.model.detectors.values()}
    exported = {
        name
        for name in detectors.__all__
        if isinstance(getattr(detectors, name), type)
        and issubclass(getattr(detectors, name), detectors.Detector)
        and name != "Detector"
    }
    assert classes == exported and len(exported) >= 35
    assert "mahalanobis_per_class" in cli.model.detectors
