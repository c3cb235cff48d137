"""Derived state is fresh in one process: a second datamodule, other weights or a second checkpoint give the rows
of a fresh model; attacked sets are rebuilt for other weights; the fingerprint sees every change of content."""

from __future__ import annotations

import pytest
import torch
from derived_helpers import build, data_for, perturbed, rows, trainer
from lightning.pytorch import Trainer

from lightning_ood.attacks import AttackedSets
from lightning_ood.derived_state import check_fresh, fingerprint, module_fingerprint, rank_zero_decides, stamp
from lightning_ood.methods import Classifier
from lightning_ood.metrics import METRIC_KEYS

#: Methods whose weights are trained (a "checkpoint B" is other weights); the others score frozen models.
TRAINED = {"classifier", "oodformer", "ssod"}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for metric in (*METRIC_KEYS, "n_id", "n_ood", "id_acc"):
            assert a[key][metric] == pytest.approx(b[key][metric], abs=1e-9, nan_ok=True), (key, metric)


def _differ(a: dict, b: dict) -> bool:
    return any(a[key]["auroc"] != b[key]["auroc"] for key in a)


@pytest.mark.parametrize(
    "name", ["classifier", "oodformer", "ssod", "frozen_encoder", "heatmap", "diffguard"]
)
def test_second_datamodule_and_other_weights_give_the_rows_of_a_fresh_model(name, tmp_path):
    """One model tested on data a, then b (other fit images and normalisation), then (trained methods) with
    other weights loaded by ``load_state_dict``, each equal to a fresh model tested once."""
    a, b = data_for(name), data_for(name, train_limit=50, std=0.4)
    run = trainer(tmp_path / "one")
    model = build(name, tmp_path)
    on_a = rows(run, model, a)
    on_b = rows(run, model, b)
    fresh_b = rows(
        trainer(tmp_path / "fresh"), build(name, tmp_path), data_for(name, train_limit=50, std=0.4)
    )
    _same(on_b, fresh_b)
    assert _differ(on_a, on_b)  # the data matters: reusing a's statistics would be seen
    if name not in TRAINED:
        return
    other = perturbed(model)
    model.load_state_dict(other)
    on_other = rows(run, model, b)
    reference = build(name, tmp_path)
    reference.load_state_dict(other)
    _same(
        on_other, rows(trainer(tmp_path / "fresh_other"), reference, data_for(name, train_limit=50, std=0.4))
    )
    assert _differ(on_b, on_other)


def _attacked(**kwargs: object):
    builder = AttackedSets(
        sets=["faces"], variants={"smooth": 5e3}, limit=3, steps=2, clean=False, grid_images=0
    )
    return data_for("classifier", test_set_builders=[builder], **kwargs)


def test_attacked_sets_are_rebuilt_for_other_weights(tmp_path):
    run, data, model = trainer(tmp_path / "one"), _attacked(), build("classifier", tmp_path)
    rows(run, model, data)
    first = data.test_dataset("faces_smooth").images.clone()
    rows(run, model, data)  # same weights: the attack is reused, not recomputed
    assert torch.equal(data.test_dataset("faces_smooth").images, first)
    other = perturbed(model)
    model.load_state_dict(other)
    second_rows = rows(run, model, data)
    second = data.test_dataset("faces_smooth").images
    assert not torch.allclose(first, second)  # attacked through the features of the weights under test
    reference = build("classifier", tmp_path)
    reference.load_state_dict(other)
    fresh_data = _attacked()
    _same(second_rows, rows(trainer(tmp_path / "fresh"), reference, fresh_data))
    torch.testing.assert_close(second, fresh_data.test_dataset("faces_smooth").images)


def test_weights_fingerprint_sees_every_change_of_content_and_nothing_else():
    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", in_chans=1)
    base = model.weights_fingerprint()
    model.detectors["knn"].fit(features=torch.randn(20, model.head.in_features))
    assert model.weights_fingerprint() == base  # fitted statistics are derived state, not weights
    buffer = next(b for n, b in model.named_buffers() if n.endswith("running_mean"))
    buffer[0] += 1e-7
    assert model.weights_fingerprint() != base  # a buffer counts (BatchNorm statistics)
    without_net = module_fingerprint(model, skip=["net", "detectors"])
    assert without_net == module_fingerprint(
        Classifier("test_resnet", in_chans=1, num_classes=10), ["net", "detectors"]
    )
    assert module_fingerprint(model) != module_fingerprint(model, skip=["detectors"])
    assert fingerprint(a=1, b=[2]) == fingerprint(b=[2], a=1) != fingerprint(a=1, b=[3])


def test_reuse_is_decided_from_the_stamp_and_logged(caplog):
    stamps: dict[str, str] = {}
    assert check_fresh(stamps, "x", lambda: "f1", "x of test") == (False, "f1")
    stamp(stamps, "x", "f1")
    with caplog.at_level("INFO"):
        assert check_fresh(stamps, "x", lambda: "f1", "x of test") == (True, "f1")
    assert "Using the x of test (same weights, data and settings)" in caplog.text
    assert check_fresh(stamps, "x", lambda: "f2")[0] is False
    stamp(stamps, "x", None)
    assert "x" not in stamps
    with pytest.raises(ZeroDivisionError):
        rank_zero_decides(lambda: 1 / 0)


@pytest.mark.parametrize("name", ["oodformer", "ssod", "heatmap"])
def test_fit_then_more_training_then_test_gives_the_rows_of_a_fresh_model(name, tmp_path):
    """Tested, trained further, tested again: the rows equal a fresh model given the trained weights and tested
    once (nothing fitted for the earlier weights survives). The Classifier's case is in test_method_state; the
    frozen encoder and DiffGuard have no training."""
    data = data_for(name, train_transforms=[])  # HeatmapOOD's targets are for the outliers as stored
    model = build(name, tmp_path)
    rows(trainer(tmp_path / "before"), model, data)
    fit = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=str(tmp_path / "fit"))  # fmt: skip
    fit.fit(model, datamodule=data)
    after = rows(trainer(tmp_path / "after"), model, data)
    reference = build(name, tmp_path)
    reference.load_state_dict(model.state_dict())
    _same(after, rows(trainer(tmp_path / "fresh"), reference, data_for(name, train_transforms=[])))
