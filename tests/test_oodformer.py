"""OODformer: post-norm [CLS] embedding, attention rollout, one-cycle schedule, label-free scores, configs, CLI."""

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.optim.lr_scheduler import OneCycleLR

from lightning_ood.callbacks.attention_maps import AttentionMaps
from lightning_ood.callbacks.ood_evaluation import OODEvaluation
from lightning_ood.cli import OODCLI, train
from lightning_ood.methods.oodformer import OODformer
from lightning_ood.nets.vit import ViTNet, attention_probs, attention_rollout, block_attentions
from lightning_ood.optim.schedules import WarmupOneCycleLR, with_total_steps

torch.set_num_threads(1)

DETECTORS = {"msp", "class_mean_euclidean", "class_mean_cosine", "mahalanobis_tied", "mahalanobis_class"}
TINY = {
    "backbone": "vit_tiny_patch16_224",
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "backbone_kwargs": {"embed_dim": 16, "depth": 2, "num_heads": 2},
}
NO_LOGGER = ["--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=1"]


def _tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=3,
        embed_dim=16,
        depth=2,
        num_heads=2,
        **kwargs,
    ).eval()
    with torch.no_grad():  # a non-trivial final LayerNorm, so pre- and post-norm [CLS] differ clearly
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    return model


# -- network ---------------------------------------------------------------------------------------------------
def test_embedding_is_post_norm_cls_and_logits_its_head():
    model = _tiny_vit()
    net = ViTNet(model)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        out = net(x)
        tokens = model.forward_features(x)  # after the final norm
        _, blocks = model.forward_intermediates(x, indices=1, output_fmt="NLC", return_prefix_tokens=True)
        _, pre_norm = blocks[0]  # (patch tokens, prefix tokens) of the last block, before the final norm
    torch.testing.assert_close(out.features, tokens[:, 0])
    torch.testing.assert_close(out.features, model.norm(pre_norm[:, 0]))
    assert not torch.allclose(out.features, pre_norm[:, 0])
    torch.testing.assert_close(out.logits, model(x))
    torch.testing.assert_close(out.logits, net.head(out.features))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_pool": "avg"}, "global_pool"),
        ({"class_token": False, "global_pool": "avg"}, "CLS"),
        ({"fc_norm": True}, "fc_norm"),
        ({"final_norm": False}, "no final norm"),
    ],
)
def test_rejects_non_cls_embeddings(kwargs, message):
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=3, depth=1, **kwargs
    )
    with pytest.raises(ValueError, match=message):
        ViTNet(model)


def test_method_validates_its_config():
    with pytest.raises(ValueError, match=r"backbone_kwargs\.global_pool"):
        OODformer(**{**TINY, "backbone_kwargs": {"global_pool": "avg", "depth": 1}})
    with pytest.raises(ValueError, match=r"backbone_kwargs\.img_size"):
        OODformer(**{**TINY, "backbone_kwargs": {"img_size": 32}})
    with pytest.raises(ValueError, match="VisionTransformer"):
        OODformer(backbone="resnet10t", in_chans=1, img_size=16)


def test_attention_matrix_reproduces_the_blocks_attention():
    model = _tiny_vit()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        attn = model.blocks[0].attn
        h = model.blocks[0].norm1(tokens)
        probs = attention_probs(attn, h)
        b, n, _ = h.shape
        v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        manual = attn.proj((probs @ v).transpose(1, 2).reshape(b, n, -1))
        reference = attn(h)  # timm's own (fused) attention
        attentions, final = block_attentions(model, x)
    torch.testing.assert_close(manual, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [a.shape for a in attentions] == [(2, 2, 17, 17)] * 2


def test_rollout_rows_sum_to_one_and_cls_map_is_the_grid():
    model = _tiny_vit()
    net = ViTNet(model)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        attentions, _ = block_attentions(model, x)
        rollout = net.attention_rollout(x)
        cls_map = net.cls_attention(x)
    assert rollout.shape == (3, 17, 17)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, 17))
    # brute force: per layer (mean over heads + I) / 2, multiplied from the first layer up
    eye = np.eye(17)
    expected = [np.eye(17)] * 3
    for att in attentions:
        a = (att.double().mean(1).numpy() + eye) / 2.0
        expected = [a[i] @ expected[i] for i in range(3)]
    np.testing.assert_allclose(rollout.numpy(), np.stack(expected), rtol=1e-5, atol=1e-6)
    assert cls_map.shape == (3, 4, 4) == (3, *net.grid_size)
    torch.testing.assert_close(cls_map, rollout[:, 0, 1:].reshape(3, 4, 4))
    with pytest.raises(ValueError):
        attention_rollout([])


# -- schedule --------------------------------------------------------------------------------------------------
def _lrs(make, steps: int) -> tuple[list[float], torch.optim.Optimizer]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    sched, lrs = make(opt), []
    for i in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if i < steps - 1:
            sched.step()
    return lrs, opt


@pytest.mark.parametrize("warmup, total", [(500, 2000), (5, 37), (2, 9)])
def test_one_cycle_matches_torch(warmup, total):
    ref, _ = _lrs(
        lambda o: OneCycleLR(
            o, max_lr=0.01, total_steps=total, pct_start=warmup / total, cycle_momentum=False
        ),
        total,
    )
    ours, opt = _lrs(lambda o: WarmupOneCycleLR(o, total_steps=total, warmup_steps=warmup), total)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert max(ours) == pytest.approx(0.01) and opt.param_groups[0]["momentum"] == 0.9  # momentum untouched


def test_total_steps_filled_from_the_trainer_only_when_unset():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lazy = with_total_steps(WarmupOneCycleLR, lambda: 1234)(opt)
    assert lazy.total_steps == 1234
    fixed = with_total_steps(lambda o: WarmupOneCycleLR(o, total_steps=99, warmup_steps=5), lambda: 1234)(opt)
    assert fixed.total_steps == 99
    other = with_total_steps(lambda o: torch.optim.lr_scheduler.StepLR(o, 3), lambda: 1 / 0)(opt)
    assert isinstance(other, torch.optim.lr_scheduler.StepLR)
    unset = WarmupOneCycleLR(opt, warmup_steps=3)
    for _ in range(2):  # warm-up and peak: no length needed
        opt.step()
        unset.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    opt.step()
    with pytest.raises(RuntimeError, match="total_steps"):
        unset.step()
    with pytest.raises(ValueError, match="total_steps"):
        unset.set_total_steps(math.inf)


# -- scores ----------------------------------------------------------------------------------------------------
def _brute_force(
    z: np.ndarray, feats: np.ndarray, labels: np.ndarray, ridge: float = 1e-6
) -> dict[str, np.ndarray]:
    """Every OODformer latent score as ``[B, C]`` per-class distances, from first principles (float64)."""
    classes = np.unique(labels)
    mus = np.stack([feats[labels == c].mean(0) for c in classes])
    out = {
        "class_mean_euclidean": ((z[:, None] - mus[None]) ** 2).sum(-1),
        "class_mean_cosine": -(z / np.linalg.norm(z, axis=1, keepdims=True))
        @ (mus / np.linalg.norm(mus, axis=1, keepdims=True)).T,
    }

    def maha(cov: np.ndarray, mu: np.ndarray) -> np.ndarray:
        d = cov.shape[0]
        prec = np.linalg.inv(cov + ridge * np.trace(cov) / d * np.eye(d))
        return np.einsum("bi,ij,bj->b", z - mu, prec, z - mu)

    centred = feats - mus[np.searchsorted(classes, labels)]
    tied = centred.T @ centred / len(feats)
    out["mahalanobis_tied"] = np.stack([maha(tied, mu) for mu in mus], axis=1)
    per_class = [np.cov(feats[labels == c].T, bias=True) for c in classes]
    out["mahalanobis_class"] = np.stack(
        [maha(cov, mu) for cov, mu in zip(per_class, mus, strict=True)], axis=1
    )
    return out


def test_scores_take_the_nearest_class_and_never_read_labels():
    torch.manual_seed(0)
    # float64 throughout (network, features, so the detectors' products too): the tolerances below are float64's
    method = OODformer(**TINY, num_classes=3).double().eval()
    # A non-degenerate final LayerNorm: at init its outputs sum to 0, which makes every covariance singular.
    with torch.no_grad():
        method.net.model.norm.weight.uniform_(0.5, 1.5)
        method.net.model.norm.bias.normal_()
    assert set(method.detectors) == DETECTORS
    images = torch.randn(240, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(240) % 3
    method.fit_detectors([(images[i : i + 64], labels[i : i + 64]) for i in range(0, 240, 64)])
    test = torch.randn(16, 1, 16, 16, dtype=torch.float64)
    truth = torch.arange(16) % 3
    with torch.no_grad():
        runs = [
            method.test_step((test, t), 0).scores
            for t in (truth, torch.full((16,), -1), truth[torch.randperm(16)], (truth + 1) % 3)
        ]
        feats = method.forward_outputs(images).features.double().numpy()
        z = method.forward_outputs(test).features.double().numpy()
    for scores in runs[1:]:
        for name in DETECTORS:
            torch.testing.assert_close(scores[name], runs[0][name], rtol=0, atol=0)
    brute = _brute_force(z, feats, labels.numpy())
    for name, per_class in brute.items():
        np.testing.assert_allclose(runs[0][name].double().numpy(), per_class.min(1), rtol=1e-5, atol=1e-6)
        # the ground-truth class's distance is what the released code used; it differs where the label is not
        # the nearest class, and the nearest class is never farther
        at_label = per_class[np.arange(16), truth.numpy()]
        assert np.all(runs[0][name].double().numpy() <= at_label + 1e-6)
        assert np.any(per_class.argmin(1) != truth.numpy())


# -- configs and CLI -------------------------------------------------------------------------------------------
CONFIG_SETS = {
    "fashionmnist_full": ["--config", "configs/oodformer_fashionmnist.yaml"],
    "tiny_on_digits": [
        "--data",
        "configs/data/digits_tiny.yaml",
        "--model",
        "configs/model/oodformer_tiny.yaml",
        "--trainer",
        "configs/trainer/cpu.yaml",
        "--model.init_args.img_size=16",
        "--trainer.callbacks+=lightning_ood.callbacks.attention_maps.AttentionMaps",
    ],
    "vitb16_cifar10_ddp": [
        "--data",
        "configs/data/cifar10_vit.yaml",
        "--model",
        "configs/model/oodformer_vitb16.yaml",
        "--trainer",
        "configs/trainer/gpu_multi.yaml",
    ],
}


@pytest.mark.parametrize("name", sorted(CONFIG_SETS))
def test_configs_instantiate(name):
    cli = OODCLI(entry="train", args=[*CONFIG_SETS[name], "--model.init_args.pretrained=false", *NO_LOGGER])
    model, dm = cli.model, cli.datamodule
    assert isinstance(model, OODformer) and set(model.detectors) == DETECTORS
    assert (model.hparams.num_classes, model.hparams.in_chans) == (dm.num_classes, dm.channels)
    assert model.hparams.resize_input or model.hparams.img_size == dm.image_size
    assert model.hparams.scheduler_interval == "step"
    sched = model.scheduler(torch.optim.SGD(model.parameters(), lr=0.01))
    assert isinstance(sched, WarmupOneCycleLR) and sched.total_steps is None and sched.warmup_steps == 500
    assert any(isinstance(cb, AttentionMaps) for cb in cli.trainer.callbacks)
    opt = model.optimizer(model.parameters())
    if name == "vitb16_cifar10_ddp":  # the paper's recipe exactly (the tiny ViT from scratch uses AdamW)
        assert isinstance(opt, torch.optim.SGD)
        assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 1e-5,
        }
        assert model.hparams.backbone.startswith("vit_base_patch16_224") and model.net.grid_size == (14, 14)
        assert cli.trainer.max_steps == 10000


@pytest.mark.slow
def test_fit_and_test_end_to_end(tmp_path):
    args = [
        *CONFIG_SETS["tiny_on_digits"],
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        *NO_LOGGER,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--ood_eval.print_table=false",
        "--model.init_args.scheduler.init_args.warmup_steps=1",
    ]
    cli = train(args=args)
    sched = cli.trainer.lr_scheduler_configs[0]
    assert sched.interval == "step" and sched.scheduler.total_steps == 3  # from estimated_stepping_batches
    rows = next(cb for cb in cli.trainer.callbacks if isinstance(cb, OODEvaluation)).rows
    assert {r["detector"] for r in rows} == DETECTORS
    assert {r["set"] for r in rows} >= {"faces", "gaussian"}
    assert all(np.isfinite(r["auroc"]) for r in rows)
    plots = Path(tmp_path) / "plots"
    assert {p.name for p in plots.glob("attention_*.png")} == {
        "attention_id.png",
        "attention_faces.png",
        "attention_gaussian.png",
    }
    assert (Path(tmp_path) / "ood_results.json").is_file()


@pytest.mark.slow
def test_image_size_mismatch_names_both_keys(tmp_path):
    args = [
        *CONFIG_SETS["tiny_on_digits"],
        "--model.init_args.img_size=28",
        "--trainer.fast_dev_run=true",
        *NO_LOGGER,
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(ValueError, match=r"model.img_size=28 but data.image_size=16"):
        train(args=args)
