"""Frozen pretrained encoders (Adaloglou et al., TMLR 2024): preprocessing applied once, the encoders' features,
the linear probe against scikit-learn, zero-shot scores by hand, and evaluate.py end to end without training."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from cli_helpers import FAST, csv_logger, rows_by_key
from encoder_helpers import TIMM_KWARGS, TINY_CLIP, SpyEncoder, encoder_override
from sklearn.linear_model import LogisticRegression

from lightning_ood.cli import check_ready, evaluate
from lightning_ood.detectors import KNN, MSP, DetectorInputs, LinearProbe
from lightning_ood.detectors.linear_probe import train_linear_probe, warmup_cosine
from lightning_ood.methods import FrozenEncoder
from lightning_ood.nets.encoders import InputSpec, TimmEncoder, prepare_input

DATA = ["--data", "configs/data/digits_tiny.yaml"]
CONFIG = ["--config", "configs/frozen_encoder_fashionmnist.yaml", *DATA]


# -- preprocessing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data_mean", "data_std"), [(0.5, 0.5), (0.2, 0.3), (0.0, 1.0)])
def test_encoder_preprocessing_is_applied_once_whatever_the_data_normalisation(data_mean, data_std):
    pixels = torch.rand(2, 1, 8, 8)
    spy = SpyEncoder(size=8, mean=0.25, std=0.125)
    model = FrozenEncoder(spy, input_mean=[data_mean], input_std=[data_std], detectors=[KNN()])
    model.forward_outputs((pixels - data_mean) / data_std)
    assert len(spy.seen) == 1  # one encoder call per forward pass
    expected = (pixels.expand(-1, 3, -1, -1) - 0.25) / 0.125  # grey -> RGB, then the encoder's mean / std
    torch.testing.assert_close(spy.seen[0], expected, atol=1e-5, rtol=0)


def test_resize_and_centre_crop_follow_the_encoder_spec():
    pixels = torch.rand(1, 3, 10, 12)
    spec = InputSpec(size=8, mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=0.8, interpolation="bilinear")
    out = prepare_input(pixels, torch.zeros(3), torch.ones(3), spec)
    resized = F.interpolate(pixels, size=(10, 12), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, resized[..., 1:9, 2:10])  # shorter side to floor(8 / 0.8) = 10, crop 8
    spec = InputSpec(size=5, mean=(0.5,), std=(0.5,), interpolation="bilinear", channels=1)
    grey = prepare_input(pixels, torch.zeros(3), torch.ones(3), spec)
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    expected = F.interpolate(luma, size=(5, 6), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(grey, (expected[..., :, 0:5] - 0.5) / 0.5)


def test_preprocessing_once_through_the_test_loop(tmp_path):
    """The spy sees every test batch exactly once, prepared from the data's normalisation (0.5 / 0.5)."""
    spy = "--model.init_args.encoder=encoder_helpers.SpyEncoder"
    cli = evaluate(
        [*DATA, "--model=lightning_ood.methods.FrozenEncoder", spy, "--model.init_args.encoder.init_args.size=16",
         "--model.init_args.detectors=[{class_path: KNN}]", *FAST, *csv_logger(tmp_path)]
    )  # fmt: skip
    seen = torch.cat(cli.model.encoder.seen)
    dm = cli.datamodule
    sizes = [len(dm.test_dataset(name)) for name in dm.test_set_names]
    assert len(seen) == len(dm.fit_dataset) + sum(sizes)  # the fit pass, then each test image once
    last = dm.test_dataset("gaussian").images[-1].float() / 255  # uint8 pixels of the last test image
    torch.testing.assert_close(seen[-1], (last.expand(3, -1, -1) - 0.25) / 0.125, atol=1e-5, rtol=0)


# -- encoders ------------------------------------------------------------------------------------------------
def test_timm_encoder_loads_weights_without_a_head(timm_weights_file):
    encoder = TimmEncoder("test_vit", weights_path=str(timm_weights_file), model_kwargs=TIMM_KWARGS)
    reference = timm.create_model("test_vit", num_classes=1000, **TIMM_KWARGS)
    reference.load_state_dict(torch.load(timm_weights_file))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(encoder.eval()(x), expected)
    assert encoder.model.get_classifier().__class__.__name__ == "Identity"
    spec = encoder.input_spec
    assert (spec.size, spec.mean, spec.crop_pct, spec.interpolation) == (32, (0.5,) * 3, 0.95, "bicubic")
    with pytest.raises(ValueError, match="has no weights: set pretrained: true"):
        TimmEncoder("test_vit")
    with pytest.raises(FileNotFoundError, match="weights_path"):
        TimmEncoder("test_vit", weights_path=str(timm_weights_file.parent / "missing.pth"))


def test_clip_pre_projection_features_project_to_the_image_embedding(clip_checkpoint_file):
    pytest.importorskip("open_clip")
    from lightning_ood.nets.clip import ClipEncoder

    pre = ClipEncoder(TINY_CLIP, checkpoint=str(clip_checkpoint_file)).eval()
    projected = ClipEncoder(TINY_CLIP, checkpoint=str(clip_checkpoint_file), features="projected").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = pre(x)
        assert z.shape == (2, 32) and projected(x).shape == (2, 16)  # the tower's width, then embed_dim
        torch.testing.assert_close(pre.project(z), projected(x))
        torch.testing.assert_close(projected(x), projected.clip.encode_image(x))
    assert pre.input_spec.mean == (0.48145466, 0.4578275, 0.40821073) and pre.input_spec.size == 32


def test_zero_shot_score_matches_a_hand_computation(clip_checkpoint_file):
    pytest.importorskip("open_clip")
    from lightning_ood.nets.clip import PROMPT_TEMPLATES, ClipEncoder

    encoder = ClipEncoder(TINY_CLIP, checkpoint=str(clip_checkpoint_file))
    names = ["cat", "dog", "ship"]
    model = FrozenEncoder(encoder, zero_shot=True, temperature=0.5, class_names=names, input_mean=[0.5],
                          input_std=[0.5], detectors=[KNN()])  # fmt: skip
    model.text_embeddings = encoder.encode_prompts(names)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_outputs(x)
        score = model.native_scores(out, x)["zero_shot"]
        text = []
        for name in names:
            prompts = encoder.tokenizer([t.format(c=name) for t in PROMPT_TEMPLATES])
            per_prompt = encoder.clip.encode_text(prompts)
            text.append(F.normalize(F.normalize(per_prompt, dim=-1).mean(0), dim=0))
        pixels = x * 0.5 + 0.5
        mean = torch.tensor(encoder.input_spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(encoder.input_spec.std).view(1, 3, 1, 1)
        projected = ClipEncoder(TINY_CLIP, checkpoint=str(clip_checkpoint_file), features="projected")
        image = F.normalize(projected.clip.encode_image((pixels - mean) / std), dim=-1)
        expected = -((image @ torch.stack(text).T) / 0.5).softmax(1).max(1).values
    torch.testing.assert_close(score, expected, atol=1e-5, rtol=0)


def test_missing_open_clip_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_open_clip(name, *args, **kwargs):
        if name == "open_clip":
            raise ImportError("No module named 'open_clip'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    from lightning_ood.nets.clip import ClipEncoder

    with pytest.raises(ImportError, match=r"lightning-ood\[clip\]"):
        ClipEncoder("ViT-B-16", checkpoint="x.bin")


# -- the linear probe ----------------------------------------------------------------------------------------
def test_linear_probe_matches_sklearn_logistic_regression():
    """Full-batch training converges to the L2-regularised multinomial logistic regression on the standardised
    features: sklearn's C = 1 / (weight_decay * N) (sklearn does not penalise the intercept; the classes are
    symmetric so the optimal intercepts are near 0 either way)."""
    torch.manual_seed(0)
    n, wd = 300, 0.1
    y = torch.arange(n) % 3
    x = torch.eye(3, 4)[y] * 3 + torch.randn(n, 4)
    probe = train_linear_probe(x, y, 3, epochs=400, batch_size=n, lr=0.05 * 256 / n, weight_decay=wd)
    z = (x - probe.mean) / probe.std
    torch.testing.assert_close(probe.std, x.std(0))
    reference = LogisticRegression(C=1 / (wd * n), tol=1e-10, max_iter=10_000).fit(
        z.double().numpy(), y.numpy()
    )
    probs = (z @ probe.weight.T + probe.bias).softmax(1).double().numpy()
    assert np.abs(reference.predict_proba(z.double().numpy()) - probs).max() < 0.01
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_, atol=0.01)


def test_linear_probe_schedule_seed_and_score():
    assert [round(warmup_cosine(s, 10, 0.2), 4) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    torch.manual_seed(1)
    x, y = torch.randn(40, 5), torch.arange(40) % 4
    a = LinearProbe(epochs=3, batch_size=16, seed=3).fit(features=x, targets=y, batch_size=7)
    b = LinearProbe(epochs=3, batch_size=16, seed=3).fit(features=x, targets=y)
    torch.testing.assert_close(a.weight, b.weight)  # deterministic, whatever the fit batches
    expected = -torch.softmax(((x - a.mean) / a.std) @ a.weight.T + a.bias, 1).amax(1)
    torch.testing.assert_close(a(DetectorInputs(features=x)), expected)
    with pytest.raises(ValueError, match="class labels >= 0"):
        LinearProbe().fit(features=x)


# -- the method ----------------------------------------------------------------------------------------------
def test_frozen_encoder_contract():
    model = FrozenEncoder(SpyEncoder())
    assert model.ready_without_training and model.checkpoint_monitor is None
    assert list(model.detectors) == ["knn", "mahalanobis", "rmd", "linear_probe"]
    assert not model.classifies and not list(model.parameters(recurse=False)) and not model.state_dict()
    check_ready(model, None)  # evaluate.py may run it without --ckpt_path
    with pytest.raises(ValueError, match=r"'msp'.*needs \['logits'\]"):
        FrozenEncoder(SpyEncoder(), detectors=[MSP()])
    with pytest.raises(ValueError, match="zero_shot needs a ClipEncoder"):
        FrozenEncoder(SpyEncoder(), zero_shot=True)
    with pytest.raises(RuntimeError, match="does not know how its input batches are normalised"):
        model.forward_outputs(torch.zeros(1, 3, 8, 8))


def test_shipped_config_evaluates_without_training_and_caches_the_fit(tmp_path, classifier_ckpt, caplog):
    """configs/frozen_encoder_fashionmnist.yaml on digits_tiny, the encoder a trained classifier's backbone."""
    args = [*CONFIG, encoder_override("checkpoint", classifier_ckpt), *FAST]
    cli = evaluate([*args, *csv_logger(tmp_path / "a")])
    rows = rows_by_key(cli)
    assert {d for d, _ in rows} == {"knn", "mahalanobis", "rmd", "linear_probe"}
    assert cli.model.classifies and cli.model.run_config["backbone"] == "classifier:test_resnet"
    probe = cli.model.detectors["linear_probe"]
    dm = cli.datamodule
    images, targets = next(iter(torch.utils.data.DataLoader(dm.test_dataset("id"), batch_size=1000)))
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        accuracy = (probe.logits(cli.model.forward_outputs(x).features).argmax(1) == targets).float().mean()
    assert rows[("knn", "faces")]["id_acc"] == pytest.approx(accuracy.item())  # id_acc is the probe's
    assert Path(f"{classifier_ckpt}.frozen_encoder.detectors.pt").is_file()
    with caplog.at_level("INFO"):
        again = evaluate([*args, *csv_logger(tmp_path / "b")])
    assert "Using the cached fit" in caplog.text
    assert rows_by_key(again)[("linear_probe", "faces")]["auroc"] == rows[("linear_probe", "faces")]["auroc"]


def test_label_free_run_reports_no_accuracy(tmp_path, timm_weights_file):
    cli = evaluate(
        [*DATA, "--model=lightning_ood.methods.FrozenEncoder", encoder_override("timm", timm_weights_file),
         "--model.init_args.detectors=[{class_path: KNN}]", *FAST, *csv_logger(tmp_path)]
    )  # fmt: skip
    rows = rows_by_key(cli)
    assert {d for d, _ in rows} == {"knn"} and rows[("knn", "faces")]["id_acc"] is None


def test_clip_zero_shot_and_pseudo_label_probe_end_to_end(tmp_path, clip_checkpoint_file):
    pytest.importorskip("open_clip")
    detectors = (
        "[{class_path: KNN}, {class_path: LinearProbe, init_args: {labels: zero_shot, name: plp, epochs: 5}}]"
    )
    cli = evaluate(
        [*DATA, "--model=lightning_ood.methods.FrozenEncoder", encoder_override("clip", clip_checkpoint_file),
         "--model.init_args.zero_shot=true", f"--model.init_args.detectors={detectors}", *FAST, *csv_logger(tmp_path)]
    )  # fmt: skip
    rows = rows_by_key(cli)
    assert {d for d, _ in rows} == {"knn", "plp", "zero_shot"}
    assert cli.model.text_embeddings.shape == (10, 16)  # the digits' class names through the text tower
    assert rows[("zero_shot", "faces")]["id_acc"] is not None  # the pseudo-label probe classifies
