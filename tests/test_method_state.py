"""What a method keeps and what it does not: detectors and frozen sub-models outside the training state, fitted
statistics never reused for other weights, the fit cache key, precision, the fit pass's batch pipeline."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import FAST, TINY, csv_logger, rows_by_key

from lightning_ood.cli import OODCLI, evaluate, train
from lightning_ood.data import IDSetSpec
from lightning_ood.detectors import ASH, KNN, MSP, Energy, Mahalanobis, ReAct, ViM
from lightning_ood.detectors.fitting import cache_path
from lightning_ood.frozen import file_sha256, load_method, save_method
from lightning_ood.methods import Classifier
from lightning_ood.metrics import METRIC_KEYS

NO_CACHE = "--model.init_args.detector_cache=false"


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A classifier trained 2 epochs, a checkpoint per epoch."""
    root = tmp_path_factory.mktemp("two_epochs")
    cli = train([*TINY, *FAST, *csv_logger(root), "--trainer.max_epochs=2", "--checkpoint.save_top_k=-1"])
    ckpts = sorted(str(p) for p in Path(cli.trainer.checkpoint_callback.dirpath).glob("best-*.ckpt"))
    assert len(ckpts) == 2
    return cli, ckpts


def _same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for metric in (*METRIC_KEYS, "n_id", "n_ood", "id_acc"):
            assert a[key][metric] == b[key][metric], (key, metric)


def test_two_checkpoints_in_one_process_equal_separate_runs(two_epochs, tmp_path):
    """Each checkpoint is scored with statistics fitted for its own weights (none carried over)."""
    first, second = two_epochs[1]
    one = OODCLI(entry="evaluate", args=[*TINY, *FAST, *csv_logger(tmp_path / "one"), NO_CACHE])
    in_one_process = []
    for ckpt in (first, second):
        one.trainer.test(one.model, datamodule=one.datamodule, ckpt_path=ckpt, verbose=False)
        in_one_process.append(rows_by_key(one))
    for k, ckpt in enumerate((first, second)):
        fresh = evaluate([*TINY, *FAST, *csv_logger(tmp_path / f"fresh{k}"), NO_CACHE, f"--ckpt_path={ckpt}"])
        _same_rows(in_one_process[k], rows_by_key(fresh))
    assert in_one_process[0][("vim", "faces")]["auroc"] != in_one_process[1][("vim", "faces")]["auroc"]


def test_fit_then_test_twice_refits(tmp_path):
    cli = OODCLI(args=[*TINY, *FAST, *csv_logger(tmp_path), "--trainer.max_epochs=1"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    before = cli.model.detectors["mahalanobis"].state_dict()["means"].clone()
    cli.trainer.fit_loop.max_epochs = 2
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not cli.model.detectors["mahalanobis"].fitted  # training made the old fit stale
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert not torch.equal(before, cli.model.detectors["mahalanobis"].state_dict()["means"])


def test_detectors_are_not_training_state(two_epochs):
    cli, ckpts = two_epochs
    ckpt = torch.load(ckpts[1], weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("detectors.")]
    assert ckpt["lightning_ood_class"] == "lightning_ood.methods.classifier.Classifier"
    assert not [n for n, _ in cli.model.named_parameters() if n.startswith("detectors.")]
    # a checkpoint of the 0.1 format held detector state: it is ignored, and a strict load still works
    model = Classifier(backbone="test_resnet", in_chans=1, detectors=[KNN()])
    old = dict(
        ckpt["state_dict"],
        **{"detectors.knn.bank": torch.ones(3, 4), "detectors.knn._fitted": torch.tensor(True)},
    )
    model.load_state_dict(old, strict=True)
    assert not model.detectors["knn"].fitted


def test_fit_cache_key_covers_content_data_and_precision(two_epochs, tmp_path, caplog):
    ckpt = str(tmp_path / "model.ckpt")
    shutil.copy(two_epochs[1][1], ckpt)
    args = [
        *TINY,
        *FAST,
        *csv_logger(tmp_path),
        f"--ckpt_path={ckpt}",
        "--model.init_args.detectors=[{class_path: Mahalanobis}]",
    ]
    cache = cache_path(ckpt)

    def stamp_after(*extra: str) -> int:
        evaluate([*args, *extra])
        return cache.stat().st_mtime_ns

    first = stamp_after()
    with caplog.at_level("INFO"):
        assert stamp_after() == first  # same everything: the cached fit is used, and the log says so
    assert "Using the cached fit of ['mahalanobis']" in caplog.text
    assert stamp_after("--data.init_args.std=0.25") != first  # other normalisation: other features
    second = stamp_after("--data.init_args.train_limit=200")  # other fit images
    assert second != first
    assert stamp_after("--trainer.precision=bf16-mixed") != second
    # same size and mtime, other content (the head's bias rewritten in place): the content hash tells
    stat = os.stat(ckpt)
    bias = torch.load(ckpt, weights_only=False)["state_dict"]["net.model.fc.bias"]
    data = Path(ckpt).read_bytes()
    assert data.count(bias.numpy().tobytes()) == 1
    Path(ckpt).write_bytes(data.replace(bias.numpy().tobytes(), (bias + 1).numpy().tobytes()))
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(ckpt).st_size == stat.st_size and os.stat(ckpt).st_mtime_ns == stat.st_mtime_ns
    assert torch.equal(torch.load(ckpt, weights_only=False)["state_dict"]["net.model.fc.bias"], bias + 1)
    before = cache.stat().st_mtime_ns
    assert stamp_after("--trainer.precision=bf16-mixed") != before


def test_scores_do_not_depend_on_autocast():
    """Under bf16 autocast the forward pass is bf16, but every detector scores in float32 or better: the scores
    equal those computed from the same (bf16) outputs promoted to float32 with autocast off."""
    torch.manual_seed(0)
    dets = [MSP(), Energy(), ReAct(), ASH(), ViM(dim=4), Mahalanobis(), KNN()]
    model = Classifier(backbone="test_resnet", in_chans=1, num_classes=5, detectors=dets).eval()
    train_x, train_y = torch.randn(64, 1, 16, 16), torch.arange(64) % 5
    model.fit_detectors([(train_x, train_y)])
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.score_batch(x, torch.zeros(16, dtype=torch.long)).scores
        raw = model.forward_outputs(x)
    assert raw.logits.dtype == torch.bfloat16  # the pass itself ran in bf16
    promoted = type(raw)(logits=raw.logits.float(), features=raw.features.float())
    model.forward_outputs = lambda _: promoted  # the same outputs, scored with autocast off
    with torch.no_grad():
        reference = model.score_batch(x, torch.zeros(16, dtype=torch.long)).scores
    for name, value in under_autocast.items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6, msg=name)


class _DoublingClassifier(Classifier):
    """Doubles every image after transfer to the device: test AND fit batches must get it."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, targets = batch
        return images * 2, targets


def test_fit_batches_go_through_the_batch_pipeline(tmp_path):
    cli = OODCLI(
        entry="evaluate",
        args=[
            *TINY,
            *FAST,
            "--trainer.logger=false",
            "--model=test_method_state._DoublingClassifier",
            "--model.init_args.backbone=test_resnet",
            "--model.init_args.detectors=[{class_path: ClassMeanEuclidean}]",
            f"--ood_eval.output_dir={tmp_path}",
        ],
    )
    seen = []
    cli.model.net.register_forward_pre_hook(lambda _, args: seen.append(float(args[0].abs().max())))
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    # normalised images lie in [-1, 1]; doubled, their largest magnitude is 2 in fit and test batches alike
    assert seen and all(v == pytest.approx(2.0) for v in seen)


def test_frozen_classifier_stays_frozen_and_out_of_checkpoints(two_epochs, tmp_path):
    source = str(tmp_path / "classifier.ckpt")
    shutil.copy(two_epochs[1][0], source)
    before = {k: v.clone() for k, v in torch.load(source, weights_only=False)["state_dict"].items()}
    cli = train(
        [
            *TINY,
            *FAST,
            *csv_logger(tmp_path),
            "--model=toy_method.FrozenProbe",
            f"--model.init_args.classifier_ckpt={source}",
            "--trainer.max_epochs=1",
            "--model.init_args.detectors=[{class_path: MSP}, {class_path: Mahalanobis}]",
        ]
    )
    probe = cli.model
    assert probe.classifier.state_dict().keys() == before.keys()
    for key, value in probe.classifier.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm statistics untouched
    assert not probe.classifier.training and all(not p.requires_grad for p in probe.classifier.parameters())
    optimised = sum(p.numel() for g in cli.trainer.optimizers[0].param_groups for p in g["params"])
    assert optimised == sum(p.numel() for p in probe.probe.parameters())
    ckpt = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert set(ckpt["state_dict"]) == {"probe.weight", "probe.bias"}
    assert ckpt["lightning_ood_frozen"]["classifier"] == {"path": source, "sha256": file_sha256(source)}
    assert {("msp", "faces"), ("mahalanobis", "far")} <= rows_by_key(cli).keys()
    # the classifier file changes: the probe's checkpoint no longer matches it
    state = torch.load(source, weights_only=False)
    state["state_dict"]["net.model.fc.bias"] += 1.0
    torch.save(state, source)
    with pytest.raises(ValueError, match=r"frozen sub-model 'classifier'.*sha256"):
        evaluate(
            [
                *TINY,
                *FAST,
                *csv_logger(tmp_path / "ev"),
                "--model=toy_method.FrozenProbe",
                f"--model.init_args.classifier_ckpt={source}",
                f"--ckpt_path={cli.trainer.checkpoint_callback.best_model_path}",
            ]
        )


def test_untrained_head_is_refused_without_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="without --ckpt_path"):
        evaluate([*TINY, *FAST, *csv_logger(tmp_path)])


def test_fit_cache_key_changes_with_every_setting_that_shapes_the_features(tmp_path):
    """Each part of the key on its own: data settings, precision, a method setting; not training-only ones."""
    from types import SimpleNamespace

    from data_helpers import tiny as tiny_datamodule  # tests/data_helpers.py

    model = Classifier(backbone="test_resnet", in_chans=1, detectors=[Mahalanobis()])

    def key(precision: str = "32-true", **data: object) -> str:
        model._trainer = SimpleNamespace(datamodule=tiny_datamodule(**data), precision=precision)
        return model.fit_key()

    base = key()
    assert key() == base
    for change in (
        {"seed": 1},
        {"val_fraction": 0.2},
        {"train_limit": 50},
        {"image_size": 12},
        {"channels": 3},
        {"mean": 0.4},
        {"std": 0.3},
        {"id_set": IDSetSpec("digits", classes=[0, 1, 2])},
    ):
        assert key(**change) != base, change
    assert key(precision="bf16-mixed") != base
    model.hparams["resize_input"] = True  # a setting that changes the features of the same weights
    assert key() != base
    del model.hparams["resize_input"]
    model.hparams["label_smoothing"] = 0.3  # training-only: the same features
    assert key() == base
    with torch.no_grad():
        model.head.bias[0] += 1e-6  # other weights (the content, not a file, is hashed)
    assert key() != base
    model._trainer = None


def test_save_method_writes_a_loadable_checkpoint_and_leaves_the_method_unchanged(tmp_path):
    torch.manual_seed(0)
    method = Classifier(backbone="test_resnet", num_classes=3, in_chans=1)
    hparams = dict(method.hparams)
    path = save_method(method, tmp_path / "built.ckpt")
    assert dict(method.hparams) == hparams  # optimizer / scheduler put back
    saved = torch.load(path, weights_only=False)["hyper_parameters"]
    assert "optimizer" not in saved and "scheduler" not in saved and saved["num_classes"] == 3
    loaded = load_method(path)
    assert type(loaded) is Classifier and not loaded.training
    state = method.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
