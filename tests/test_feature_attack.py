"""The feature-matching attack (Adaloglou et al., TMLR 2024): it pulls embeddings onto their targets, is batched
and seeded, and its attacked sets join the evaluation with and without the targets in the k-NN bank."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import FAST, csv_logger, eval_callback, rows_by_key, run_script
from encoder_helpers import encoder_override
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from lightning_ood.attacks import AttackedSets, FeatureMatchingAttack, KNNWithoutTargets, smoothness
from lightning_ood.cli import evaluate
from lightning_ood.compare_tables import render
from lightning_ood.data import IDSetSpec, OODDataModule
from lightning_ood.data.datasets import OODSetSpec
from lightning_ood.detectors import KNN, DetectorInputs
from lightning_ood.distributed import gathered_order


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten())  # fmt: skip
    return net.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_attack_lowers_the_cosine_distance_to_the_target_and_stays_in_range():
    net = _encoder()
    ood, targets = _images(6, 1), _images(6, 2)
    result = FeatureMatchingAttack(steps=60, lr=1e-2, smoothness=0.0, batch_size=4)(net, ood, targets)
    with torch.no_grad():
        goal = net(targets)
        before = torch.cosine_similarity(net(ood), goal)
        after = torch.cosine_similarity(net(ood + result.delta), goal)
    torch.testing.assert_close(result.cos_before, before)
    torch.testing.assert_close(result.cos_after, after)
    assert ((1 - after) < 0.5 * (1 - before)).all()  # every image at least halves its cosine distance
    attacked = ood + result.delta
    assert attacked.min() >= 0 and attacked.max() <= 1  # clamped to the valid pixel range
    assert all(p.grad is None for p in net.parameters())  # gradients reach delta only


def test_smooth_variant_has_smoother_perturbations_than_patchy():
    net, ood, targets = _encoder(), _images(4, 3), _images(4, 4)
    patchy = FeatureMatchingAttack(steps=30, lr=1e-2, smoothness=0.0)(net, ood, targets)
    smooth = FeatureMatchingAttack(steps=30, lr=1e-2, smoothness=5e3)(net, ood, targets)
    assert (smoothness(smooth.delta) < smoothness(patchy.delta)).all()


def test_attack_is_seeded_and_does_not_depend_on_the_batch_size():
    net, ood, targets = _encoder(), _images(5, 5), _images(5, 6)
    attack = FeatureMatchingAttack(steps=10, lr=1e-2, batch_size=5)
    noise = attack.initial_noise(tuple(ood.shape), seed=7)
    torch.testing.assert_close(noise, attack.initial_noise(tuple(ood.shape), seed=7))
    assert noise.std().item() == pytest.approx(1e-3, rel=0.2)  # delta ~ N(0, 1e-3^2)
    whole = attack(net, ood, targets, noise)
    split = FeatureMatchingAttack(steps=10, lr=1e-2, batch_size=2)(net, ood, targets, noise)
    torch.testing.assert_close(whole.delta, split.delta, atol=1e-6, rtol=0)


def test_smoothness_is_the_mean_squared_image_gradient():
    delta = torch.randn(2, 3, 5, 4)
    dy = torch.zeros_like(delta)
    dx = torch.zeros_like(delta)
    dy[..., :-1, :] = delta[..., 1:, :] - delta[..., :-1, :]  # torchmetrics' image_gradients: zero last row
    dx[..., :, :-1] = delta[..., :, 1:] - delta[..., :, :-1]
    expected = dy.square().mean(dim=(1, 2, 3)) + dx.square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(smoothness(delta), expected)


def test_attacked_set_names_and_validation():
    specs = [OODSetSpec("digits", "digits", "near"), OODSetSpec("noise", "gaussian")]
    builder = AttackedSets(sets=["digits"], variants={"smooth": 5e3, "patchy": 0.0})
    assert builder.set_groups(specs) == {
        "digits_clean": "near",
        "digits_smooth": "near",
        "digits_patchy": "near",
    }
    with pytest.raises(ValueError, match=r"\['photos'\] are not OOD sets"):
        AttackedSets(sets=["photos"]).set_groups(specs)
    dm = OODDataModule(IDSetSpec("fashionmnist"), specs, test_set_builders=[builder])
    assert dm.test_set_names == ["id", "digits", "noise", "digits_clean", "digits_smooth", "digits_patchy"]
    assert dm.test_set_groups["digits_patchy"] == "near"
    with pytest.raises(ValueError, match="set name 'digits_clean' is taken"):
        OODDataModule(
            IDSetSpec("fashionmnist"),
            [*specs, OODSetSpec("digits_clean", "faces")],
            test_set_builders=[builder],
        )


def test_knn_without_targets_drops_exactly_the_targets_on_one_and_two_ranks():
    np.testing.assert_array_equal(gathered_order(5, 2), [0, 2, 4, 1, 3])
    features = torch.randn(10, 4)

    knn = KNNWithoutTargets()
    knn.configure(SimpleNamespace(test_set_builders=[SimpleNamespace(fit_rows_used=np.array([1, 7]))]))
    knn.fit(features=features)
    reference = KNN().fit(features=features[[0, 2, 3, 4, 5, 6, 8, 9]])
    torch.testing.assert_close(knn.bank, reference.bank)
    queries = DetectorInputs(features=features[:3])
    torch.testing.assert_close(knn(queries), reference(queries))
    with pytest.raises(ValueError, match="no test set builder with targets"):
        KNNWithoutTargets().configure(object())


def _shrunk_attack_config(tmp_path: Path, fmnist_root: str) -> Path:
    """configs/attack_fashionmnist.yaml on tiny data: a fake Fashion-MNIST (40 train / 20 test images), 12 images
    per OOD set, 3 attacked images per set with 3 attack steps; every other setting is the shipped config's."""
    config = yaml.safe_load(Path("configs/attack_fashionmnist.yaml").read_text())
    data = config["data"]["init_args"]
    data.update(root=fmnist_root, eval_batch_size=32, num_workers=0)
    for spec in data["ood_sets"]:
        spec["limit"] = 12
    builder = data["test_set_builders"][0]["init_args"]
    builder.update(limit=3, steps=3, batch_size=2, save_dir=str(tmp_path / "attacked"), grid_images=2)
    path = tmp_path / "attack.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_shipped_attack_config_scores_clean_and_attacked_sets(tmp_path, classifier_ckpt, fmnist_root):
    config = _shrunk_attack_config(tmp_path, fmnist_root)
    cli = evaluate(["--config", str(config), encoder_override("checkpoint", classifier_ckpt),
                    *FAST, *csv_logger(tmp_path / "logs")])  # fmt: skip
    rows = rows_by_key(cli)
    names = cli.datamodule.test_set_names
    assert names[:7] == ["id", "digits", "faces", "textures", "photos", "gaussian", "uniform"]
    assert names[7:10] == ["digits_clean", "digits_smooth", "digits_patchy"] and len(names) == 25
    assert {d for d, _ in rows} == {"knn", "knn_without_targets", "mahalanobis", "rmd", "linear_probe"}
    assert rows[("knn", "photos_patchy")]["n_ood"] == 3 and rows[("knn", "photos")]["n_ood"] == 12
    builder = cli.datamodule.test_set_builders[0]
    knn = cli.model.detectors["knn"]
    without = cli.model.detectors["knn_without_targets"]
    assert without.bank.shape[0] == knn.bank.shape[0] - len(builder.fit_rows_used)
    clean = cli.datamodule.test_dataset("faces_clean").images
    attacked = cli.datamodule.test_dataset("faces_smooth").images
    assert clean.dtype == torch.uint8 and attacked.dtype == torch.float32
    assert 0 < (attacked - clean.float() / 255).abs().max() < 0.05  # 3 Adam steps of 1e-3 pixels
    pngs = sorted((tmp_path / "attacked" / "faces_smooth").glob("*.png"))
    assert len(pngs) == 3 and (tmp_path / "attacked" / "faces_smooth" / "attack.json").is_file()
    out = eval_callback(cli).output_path
    assert (out / "plots" / "attack_faces_patchy.png").is_file()
    table = render(["attack", str(out)])  # python -m lightning_ood.compare attack <run>
    assert "| score | clean | smooth | patchy |" in table and "| knn_without_targets | " in table
    assert "| digits | patchy | " in table


def test_attack_on_a_trained_classifier_checkpoint(tmp_path, classifier_ckpt):
    """Any method's features can be attacked: here a Classifier tested from its checkpoint with evaluate.py. The
    attacked sets are built with the checkpoint's weights: the similarities the attack recorded are recomputed
    from them."""
    settings = f"sets: [faces], limit: 4, steps: 2, grid_images: 0, save_dir: {tmp_path / 'attacked'}"
    builder = "[{class_path: lightning_ood.attacks.AttackedSets, init_args: {" + settings + "}}]"
    cli = evaluate(
        ["--data", "configs/data/digits_tiny.yaml", f"--data.init_args.test_set_builders={builder}",
         "--model", "configs/model/classifier_tiny.yaml", f"--ckpt_path={classifier_ckpt}",
         "--model.init_args.detectors=[{class_path: MSP}, {class_path: KNN}, "
         "{class_path: lightning_ood.attacks.KNNWithoutTargets}]",
         *FAST, *csv_logger(tmp_path)]
    )  # fmt: skip
    rows = rows_by_key(cli)
    dm = cli.datamodule
    assert dm.test_set_names == ["id", "faces", "gaussian", "faces_clean", "faces_smooth", "faces_patchy"]
    assert rows[("knn_without_targets", "faces_patchy")]["n_ood"] == 4 and rows[("msp", "faces")]["id_acc"]
    info = json.loads((tmp_path / "attacked" / "faces_smooth" / "attack.json").read_text())
    clean = dm.test_dataset("faces_clean").images.float() / 255
    targets = dm.fit_dataset.images[info["fit_targets"]].float() / 255
    with torch.no_grad():
        features = [cli.model.eval().forward_outputs((x - 0.5) / 0.5).features for x in (clean, targets)]
    expected = torch.cosine_similarity(*features)
    np.testing.assert_allclose(info["cos_before"], expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_two_processes_attack_probe_and_bank_equal_one(tmp_path, classifier_ckpt):
    """Under DDP the attack is split across ranks and gathered, the probe trains on the rows in dataset order and
    the k-NN bank drops the same targets: 2 CPU processes give the metrics of one."""
    attack = "sets: [faces], limit: 5, steps: 3, grid_images: 0"
    builder = "[{class_path: lightning_ood.attacks.AttackedSets, init_args: {" + attack + "}}]"
    detectors = ("[{class_path: KNN}, {class_path: lightning_ood.attacks.KNNWithoutTargets}, "
                 "{class_path: LinearProbe, init_args: {epochs: 5}}, {class_path: Mahalanobis}]")  # fmt: skip
    common = ["--data", "configs/data/digits_tiny.yaml", f"--data.init_args.test_set_builders={builder}",
              "--model=lightning_ood.methods.FrozenEncoder", encoder_override("checkpoint", classifier_ckpt),
              f"--model.init_args.detectors={detectors}", "--model.init_args.detector_cache=false",
              *FAST[:1], *FAST[2:], "--trainer.logger=false"]  # fmt: skip
    run_script("evaluate.py", [*common, "--trainer.devices=1", f"--ood_eval.output_dir={tmp_path / 'one'}"])
    run_script("evaluate.py", [*common, "--trainer.devices=2", "--trainer.strategy=ddp",
                               f"--ood_eval.output_dir={tmp_path / 'two'}"])  # fmt: skip
    one, two = rows_by_key(tmp_path / "one"), rows_by_key(tmp_path / "two")
    assert one.keys() == two.keys() and ("knn_without_targets", "faces_patchy") in one
    for key, row in one.items():
        assert (two[key]["n_id"], two[key]["n_ood"]) == (row["n_id"], row["n_ood"])
        assert two[key]["id_acc"] == pytest.approx(row["id_acc"], abs=1e-9)
        assert two[key]["auroc"] == pytest.approx(row["auroc"], abs=1e-6), key


def test_attack_grids_go_to_png_and_wandb(tmp_path):
    """The example grid (clean | delta x 10 | attacked) is written as a PNG and logged to W&B as an image."""
    wandb = MagicMock(spec=WandbLogger)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[wandb])
    clean = _images(3, 8)
    result = FeatureMatchingAttack(steps=2)(_encoder(), clean, _images(3, 9))
    AttackedSets(sets=["x"], grid_images=2)._report(
        "x_smooth", clean, result, np.arange(3), tmp_path, trainer
    )
    path = tmp_path / "plots" / "attack_x_smooth.png"
    assert path.is_file() and path.stat().st_size > 1000
    wandb.log_image.assert_called_once_with(key="test/attack", images=[str(path)], caption=["x_smooth"])
