"""HeatmapOOD end to end on tiny data: trained through the CLI on a frozen classifier checkpoint, which stays
bit-identical and in eval mode, is not copied into the decoder's checkpoints, and must match the data; targets
against brute force; the training loss against the formula; evaluation from the decoder's checkpoint."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import FAST, csv_logger, rows_by_key
from lightning.pytorch import Callback

from lightning_ood.cli import OODCLI, evaluate, train
from lightning_ood.frozen import file_sha256, load_method
from lightning_ood.methods.heatmap_targets import pixel_keys

DATA = [
    "--data",
    "configs/data/digits_tiny.yaml",
    "--data.init_args.train_transforms=[]",
    "--data.init_args.aux_val_fraction=0.25",
]


def heatmap_args(ckpt: Path) -> list[str]:
    return [*DATA, "--model", "configs/model/heatmap_tiny.yaml", f"--model.init_args.classifier_ckpt={ckpt}"]


class ModeProbe(Callback):
    """Records, at every training batch, whether any classifier module and the decoder are in training mode."""

    def __init__(self) -> None:
        self.classifier_training: list[bool] = []
        self.decoder_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.classifier_training.append(any(m.training for m in pl_module.classifier.modules()))
        self.decoder_training.append(pl_module.decoder.training)


@pytest.fixture(scope="module")
def run(classifier_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("heatmap")
    cli = train(
        [
            *heatmap_args(classifier_ckpt),
            *FAST,
            *csv_logger(root),
            "--trainer.max_epochs=2",
            "--trainer.callbacks+=test_heatmap_cli.ModeProbe",
            "--trainer.callbacks+=lightning_ood.callbacks.HeatmapPictures",
            "--trainer.callbacks.num_images=3",
        ]
    )
    return cli, classifier_ckpt, root


def test_classifier_is_bit_identical_and_stays_in_eval_mode(run) -> None:
    cli, ckpt, _ = run
    fresh = load_method(ckpt).state_dict()
    after = cli.model.classifier.state_dict()
    assert fresh.keys() == after.keys()
    assert any("running_mean" in k for k in after)  # BatchNorm statistics are among what is compared
    assert all(torch.equal(fresh[k], after[k]) for k in fresh)
    probe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ModeProbe")
    assert len(probe.classifier_training) == 2 * 8  # 2 epochs of 256 / 32 batches
    assert not any(probe.classifier_training) and all(probe.decoder_training)
    assert not any(p.requires_grad for p in cli.model.classifier.parameters())


def test_decoder_checkpoint_holds_no_classifier(run) -> None:
    cli, ckpt, _ = run
    saved = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=False)
    keys = saved["state_dict"].keys()
    assert not [k for k in keys if k.startswith("classifier.")]
    assert any(k.startswith("decoder.") for k in keys) and {"feature_min", "feature_max"} <= set(keys)
    assert saved["lightning_ood_frozen"]["classifier"] == {"path": str(ckpt), "sha256": file_sha256(ckpt)}


def test_best_checkpoint_by_the_validation_loss_on_id_and_outliers(run) -> None:
    cli, _, root = run
    assert cli.trainer.checkpoint_callback.monitor == "val/loss"
    with next(root.glob("run/version_*/metrics.csv")).open() as f:
        val = [row for row in csv.DictReader(f) if row["val/loss"]]
    assert len(val) == 2  # one per epoch
    for row in val:
        id_loss, outlier_loss = float(row["val/id_loss"]), float(row["val/outlier_loss"])
        assert float(row["val/loss"]) == pytest.approx((id_loss + outlier_loss) / 2, rel=1e-6)
        assert outlier_loss > 0


def test_every_score_from_one_pass_and_pictures(run) -> None:
    cli, _, _ = run
    rows = rows_by_key(cli)
    scores = {d for d, _ in rows}
    assert {"heatmap", "msp", "energy", "mahalanobis", "vim", "knn"} <= scores
    assert rows[("heatmap", "faces")]["n_ood"] == 50 and rows[("heatmap", "faces")]["id_acc"] is not None
    assert (
        rows[("heatmap", "faces")]["backbone"] == "test_resnet"
    )  # the classifier's, not the CLI's arguments
    pictures = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "HeatmapPictures")
    assert sorted(p.name for p in pictures.paths) == [
        f"heatmaps_{s}.png" for s in ("faces", "gaussian", "id")
    ]
    assert all(p.stat().st_size > 0 for p in pictures.paths)


def _features(classifier, dataset, collate) -> tuple[np.ndarray, np.ndarray]:
    images, _ = collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        out = classifier.forward_outputs(images)
    return out.features.double().numpy(), out.logits.argmax(1).numpy()


def test_targets_equal_a_brute_force_search(run) -> None:
    cli, ckpt, _ = run
    dm, model = cli.datamodule, cli.model
    collate = dm.fit_dataloader().collate_fn
    classifier = load_method(ckpt)
    id_f, id_c = _features(classifier, dm.fit_dataset, collate)
    aux = dm.aux_fit_dataloader().dataset
    aux_f, aux_c = _features(classifier, aux, collate)
    expected = []
    for f, c in zip(aux_f, aux_c, strict=True):
        rows = np.flatnonzero(id_c == c) if (id_c == c).any() else np.arange(len(id_c))
        expected.append(rows[((id_f[rows] - f) ** 2).sum(1).argmin()])
    assert model.targets.rows.tolist() == expected
    images, _ = collate([aux[i] for i in range(len(aux))])
    looked_up = model.outlier_targets(images)  # in [-1, 1]
    id_images = torch.stack([dm.fit_dataset[int(r)][0] for r in expected]).float() / 255 * 2 - 1
    assert torch.equal(looked_up, id_images)


def test_training_loss_is_the_weighted_squared_error(run) -> None:
    cli, _, _ = run
    dm, model = cli.datamodule, cli.model.eval()
    collate = dm.fit_dataloader().collate_fn
    x_id, _ = collate([dm.fit_dataset[i] for i in range(5)])
    aux = dm.aux_fit_dataloader().dataset
    x_out, _ = collate([aux[i] for i in range(4)])
    x = torch.cat([x_id, x_out])
    with torch.no_grad():
        out = model.classifier.forward_outputs(x)
        z = (out.features - model.feature_min) / (model.feature_max - model.feature_min)
        h = model.decoder(z, out.logits.argmax(1))
        got = model.per_image_loss(x, torch.cat([model.pixels(x_id), model.outlier_targets(x_out)]))
    pixels = x * 0.5 + 0.5  # digits_tiny: mean = std = 0.5
    rows = model.targets.rows[:4]
    target_id = torch.stack([dm.fit_dataset[int(r)][0] for r in rows]).float() / 255
    targets = torch.cat([pixels[:5], target_id]) * 2 - 1
    px = pixels * 2 - 1
    expected = ((1 + 5 * targets.abs()) * (px + h - targets) ** 2).sum(dim=(1, 2, 3))
    assert torch.allclose(got, expected, rtol=1e-5)
    assert (
        model.cache.get(pixel_keys(x, model.pixel_mean, model.pixel_std)) is not None
    )  # got: from the cache
    cache, model.cache = model.cache, None  # the classifier's cached training outputs equal a forward pass
    try:
        with torch.no_grad():
            uncached = model.per_image_loss(x, torch.cat([model.pixels(x_id), model.outlier_targets(x_out)]))
    finally:
        model.cache = cache
    assert torch.allclose(got, uncached, rtol=1e-5)
    assert got[:5].max() < got[5:].max()  # sanity: ID images start near their own target


def test_training_without_the_output_cache_is_the_same(run, tmp_path: Path) -> None:
    """``cache_classifier_outputs=false``: nothing cached, every training step and the detector fit run the
    frozen classifier; the same feature range, targets, trained decoder and scores as the fixture's run (auto:
    tiny data is cached)."""
    cli, ckpt, _ = run
    args = [*heatmap_args(ckpt), *FAST, *csv_logger(tmp_path), "--trainer.max_epochs=2"]
    uncached = train([*args, "--model.init_args.cache_classifier_outputs=false"])
    model, cached = uncached.model, cli.model
    assert cached.cache is not None and model.cache is None
    images = next(iter(cli.datamodule.fit_dataloader()))[0]
    assert model._cached_outputs(images) is None  # the detector fit ran the classifier
    assert torch.equal(model.targets.rows, cached.targets.rows)
    assert (model.feature_min, model.feature_max) == (cached.feature_min, cached.feature_max)
    for key, value in cached.decoder.state_dict().items():
        torch.testing.assert_close(model.decoder.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)
    first, second = rows_by_key(cli), rows_by_key(uncached)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key]["auroc"] == pytest.approx(second[key]["auroc"], abs=1e-6), key


def test_evaluating_the_decoder_checkpoint_repeats_the_scores(run, tmp_path: Path) -> None:
    """A fresh process rebuilds everything from the decoder's checkpoint and the classifier's file; its detector
    fit runs the classifier (no cache), where training's test read the classifier's cached training outputs."""
    cli, ckpt, _ = run
    best = cli.trainer.checkpoint_callback.best_model_path
    args = [*heatmap_args(ckpt), *FAST, *csv_logger(tmp_path), "--model.init_args.detector_cache=false"]
    again = evaluate([*args, f"--ckpt_path={best}"])
    assert again.model.cache is None
    images = next(iter(cli.datamodule.fit_dataloader()))[0]
    assert cli.model._cached_outputs(images) is not None  # training's test fitted from the cache
    first, second = rows_by_key(cli), rows_by_key(again)
    for score in ("heatmap", "msp", "mahalanobis", "vim", "knn"):
        for group in ("faces", "gaussian", "all"):
            assert first[(score, group)]["auroc"] == pytest.approx(second[(score, group)]["auroc"], abs=1e-9)


@pytest.mark.parametrize(
    ("override", "theirs", "ours"),
    [
        ("--data.init_args.id_set.classes=[0, 1, 2]", "classes 10", "classes 3"),
        ("--data.init_args.channels=3", "channels 1", "channels 3"),
        ("--data.init_args.image_size=20", "image size 16", "image size 20"),
        ("--data.init_args.mean=0.4", "mean (0.5,)", "mean (0.4,)"),
    ],
)
def test_a_classifier_that_does_not_match_the_data_is_refused(
    classifier_ckpt: Path, tmp_path: Path, override: str, theirs: str, ours: str
) -> None:
    with pytest.raises(ValueError) as error:
        cli = OODCLI(args=[*heatmap_args(classifier_ckpt), override, *FAST, *csv_logger(tmp_path)])
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # size and normalisation are checked at setup
    message = str(error.value)
    assert theirs in message and ours in message and str(classifier_ckpt) in message


def test_an_oodformer_checkpoint_is_a_classifier_too(tmp_path: Path) -> None:
    """Any lightning-ood method that classifies can be the frozen classifier: here a tiny OODformer ViT."""
    vit = train(
        [
            *DATA,
            "--model",
            "configs/model/oodformer_tiny.yaml",
            "--model.init_args.img_size=16",
            "--model.init_args.backbone_kwargs={embed_dim: 16, depth: 1, num_heads: 2}",
            "--model.init_args.scheduler.init_args.warmup_steps=1",
            *FAST,
            *csv_logger(tmp_path / "vit"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--test_after_fit=false",
        ]
    )
    ckpt = Path(vit.trainer.checkpoint_callback.best_model_path)
    cli = OODCLI(
        args=[*heatmap_args(ckpt), *FAST, *csv_logger(tmp_path / "heatmap"), "--trainer.max_epochs=1"]
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert type(cli.model.classifier).__name__ == "OODformer" and cli.model.decoder.image_size == 16
    fresh = load_method(ckpt).state_dict()
    assert all(torch.equal(v, cli.model.classifier.state_dict()[k]) for k, v in fresh.items())
    scores = cli.model.native_scores(cli.model.forward_outputs(torch.zeros(2, 1, 16, 16)), torch.zeros(0))
    assert scores["heatmap"].shape == (2,) and torch.isfinite(scores["heatmap"]).all()
