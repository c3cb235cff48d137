"""DiffGuard on tiny random models: the DDIM round trip, batch independence, what its checkpoints hold, classifier
guidance without the UNet in the graph, the standardised combination, and diffusers pipeline folders."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusion_helpers import CLASSES, SIZE, TIMESTEPS, tiny_checkpoints, tiny_denoiser, tiny_diffguard

from lightning_ood.contract import DetectorInputs
from lightning_ood.detectors import Energy
from lightning_ood.frozen import file_sha256, save_method
from lightning_ood.nets.ddim import ddim_invert, ddim_regenerate, ddim_step, ddim_timesteps
from lightning_ood.nets.diffusion_loading import load_denoiser


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffguard")
    tiny_checkpoints(path)
    return path


def round_trip_error(steps: int) -> float:
    den = tiny_denoiser()
    x = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    timesteps = ddim_timesteps(60, steps)
    with torch.no_grad():
        back = ddim_regenerate(den, ddim_invert(den, x, timesteps, y), timesteps, y)
    return float((back - x).pow(2).mean().sqrt())


def test_inversion_then_regeneration_with_the_same_label_returns_the_input():
    # The DDIM ODE (eta = 0) is deterministic: inverting and regenerating with the same label would return x exactly
    # with an exact solver. DDIM is the first-order (Euler) solver of that ODE in (x / sqrt(a), sqrt(1-a) / sqrt(a)),
    # and inversion evaluates eps one step below where regeneration does, so the round-trip error is O(step): it
    # shrinks about in proportion to 1 / steps. On this tiny model (t* = 60 of 100), measured RMS errors: ~0.029
    # with 3 steps, ~0.0029 with 30 steps (pixels in [-1, 1]).
    few, many = round_trip_error(3), round_trip_error(30)
    assert many < 0.006
    assert many < few / 5  # first order: 10x the steps, about 10x smaller; 5x leaves room for the constant


@pytest.mark.parametrize("guidance", ["classifier_free", "classifier"])
def test_batched_scores_equal_batch_size_one(root, guidance):
    dg = tiny_diffguard(root, guidance=guidance)
    x = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        batched = dg.native_scores(dg.forward_outputs(x), x)
        single = [dg.native_scores(dg.forward_outputs(x[i : i + 1]), x[i : i + 1]) for i in range(len(x))]
    for name, value in batched.items():
        one_by_one = torch.cat([s[name] for s in single])
        assert value.shape == (5,)
        torch.testing.assert_close(value, one_by_one, rtol=1e-3, atol=1e-6, msg=name)


def test_checkpoints_hold_neither_unet_nor_classifier_weights(root, tmp_path):
    classifier, diffusion = root / "classifier.ckpt", root / "diffusion.ckpt"
    before = file_sha256(classifier)
    dg = tiny_diffguard(root)
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        dg.native_scores(dg.forward_outputs(x), x)
    assert dg.state_dict() == {}  # nothing of DiffGuard is training state
    ckpt = torch.load(save_method(dg, tmp_path / "diffguard.ckpt"), weights_only=False)
    assert not [k for k in ckpt["state_dict"] if "unet" in k or k.startswith(("classifier.", "diffusion."))]
    frozen = ckpt["lightning_ood_frozen"]
    assert (
        frozen["classifier"]["sha256"] == file_sha256(classifier) == before
    )  # the classifier file is untouched
    assert frozen["diffusion"] == {"path": str(diffusion), "sha256": file_sha256(diffusion)}
    classifier_keys = torch.load(classifier, weights_only=False)["state_dict"]
    assert classifier_keys and not [k for k in classifier_keys if "unet" in k or "diffusion" in k]
    frozen_params = [*dg.classifier.parameters(), *dg.diffusion.parameters()]
    assert frozen_params and not any(p.requires_grad for p in frozen_params)


def test_classifier_guidance_differentiates_the_classifier_only(root):
    dg = tiny_diffguard(root, guidance="classifier", classifier_scale=3.0)
    calls = []
    original = dg.diffusion.predict_noise

    def spy(x, t, labels):
        eps = original(x, t, labels)
        calls.append((torch.is_grad_enabled(), x.requires_grad, eps.requires_grad))
        return eps

    dg.diffusion.predict_noise = spy
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    preds = torch.tensor([0, 1, 2])
    guided = dg.regenerate(x, preds).regenerated
    assert calls and not any(any(c) for c in calls)  # the UNet never ran with autograd on
    # the correction against the chain rule done by hand: x0_hat = (x_t - f eps) / sqrt(a), b = f x0_hat + (1-f) x_t,
    # so d b / d x_t = f / sqrt(a) + 1 - f (eps constant) and grad_{x_t} = (f / sqrt(a) + 1 - f) grad_b log p(y|b)
    z, eps, alpha = torch.randn(3, 1, SIZE, SIZE), torch.randn(3, 1, SIZE, SIZE), 0.7
    f = (1 - alpha) ** 0.5
    corrected = dg._classifier_guidance(preds, (1, SIZE, SIZE))(z, None, eps, alpha)
    blend = (f * (z - f * eps) / alpha**0.5 + (1 - f) * z).requires_grad_(True)
    log_p = dg.classifier.forward_outputs(dg.from_unit(blend)).logits.log_softmax(1)[range(3), preds].sum()
    (grad_b,) = torch.autograd.grad(log_p, blend)
    expected = eps - 3.0 * f * (f / alpha**0.5 + 1 - f) * grad_b
    torch.testing.assert_close(corrected, expected, rtol=1e-4, atol=1e-6)
    assert (corrected - eps).abs().max() > 0
    unguided = (
        tiny_diffguard(root, guidance="classifier", classifier_scale=0.0).regenerate(x, preds).regenerated
    )
    assert (guided - unguided).abs().max() > 0


def test_combined_score_is_the_standardised_sum(root):
    dg = tiny_diffguard(root, combine_with="energy", combine_measure="l2", detectors=[Energy()])
    val = torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    test = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        parts = [dg.combined_inputs(chunk) for chunk in val.split(4)]
        for part in parts:
            dg.standardiser.update(part)
        dg.standardiser.finalize()
        scores = dg.native_scores(dg.forward_outputs(test), test)
        test_energy = Energy().score(DetectorInputs(logits=dg.forward_outputs(test).logits)).numpy()
    val_l2 = np.concatenate([p["diffguard_l2"].numpy() for p in parts]).astype(np.float64)
    val_energy = np.concatenate([p["energy"].numpy() for p in parts]).astype(np.float64)
    assert len(val_l2) == 6
    l2 = scores["diffguard_l2"].numpy().astype(np.float64)
    expected = (l2 - val_l2.mean()) / val_l2.std(ddof=1) + (test_energy - val_energy.mean()) / val_energy.std(
        ddof=1
    )
    np.testing.assert_allclose(scores["diffguard_l2_plus_energy"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_unconditional_model_needs_classifier_guidance(root, tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    folder = tmp_path / "ddim"
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=TIMESTEPS)).save_pretrained(folder)
    den, weights = load_denoiser(folder)
    assert not den.conditional and weights.parent.name == "unet"
    z, t = torch.randn(2, 1, SIZE, SIZE), torch.tensor([5, 50])
    torch.testing.assert_close(den.predict_noise(z, t, None), unet(z, t).sample)
    with pytest.raises(ValueError, match="unconditional: use guidance: classifier"):
        _diffguard_on(root, folder, "classifier_free")
    dg = _diffguard_on(root, folder, "classifier")
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    scores = dg.native_scores(dg.forward_outputs(x), x)
    assert all(torch.isfinite(v).all() for v in scores.values())


def _diffguard_on(root, folder, guidance, **kwargs):
    from lightning_ood.methods import DiffGuard

    return DiffGuard(
        str(root / "classifier.ckpt"), str(folder), num_classes=CLASSES, in_chans=1, guidance=guidance,
        t_star=60, steps=3, input_mean=[0.5], input_std=[0.5], detectors=[Energy()], combine_with=None,
        **kwargs,
    )  # fmt: skip


def test_latent_dit_pipeline_through_its_vae(root, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=4, patch_size=2, num_embeds_ada_norm=CLASSES,
    )  # fmt: skip
    folder = tmp_path / "dit"
    DiTPipeline(
        transformer=dit, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=TIMESTEPS)
    ).save_pretrained(folder)
    den, _ = load_denoiser(folder)
    assert den.conditional and den.num_classes == CLASSES and den.image_size == 8
    dg = _diffguard_on(root, folder, "classifier_free", reference="unconditional")
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        regen = dg.regenerate(x)
    assert regen.regenerated.shape == x.shape and regen.reference.shape == x.shape


def _standardise_on_rank(rank: int, scores: dict, world: int) -> tuple:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ood.methods.diffguard_fit import validation_subset
    from lightning_ood.methods.diffguard_scores import Standardiser

    std = Standardiser(tuple(scores))
    std.update({k: v[rank::world] for k, v in scores.items()})
    std.finalize()

    class Data:  # the part of OODDataModule that validation_subset reads
        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.arange(23)), batch_size=4)

    seen = torch.cat([b[0] for b in validation_subset(Data(), 15)])
    return std.moments, seen


@pytest.mark.slow
def test_standardisation_statistics_are_summed_across_ranks():
    from ddp_helpers import run_ddp

    from lightning_ood.methods.diffguard_scores import Standardiser

    g = torch.Generator().manual_seed(6)
    scores = {"diffguard_logits": torch.rand(11, generator=g), "energy": torch.randn(11, generator=g)}
    (m0, seen0), (m1, seen1) = run_ddp(_standardise_on_rank, scores, 2)
    one = Standardiser(tuple(scores))
    one.update(scores)
    one.finalize()
    torch.testing.assert_close(m0, one.moments)
    torch.testing.assert_close(m1, one.moments)
    # the validation subset: the first 15 images, each on exactly one rank
    assert sorted(torch.cat([seen0, seen1]).tolist()) == list(range(15))


def test_clipped_ddim_step_keeps_the_predicted_x0_on_the_image_range():
    g = torch.Generator().manual_seed(7)
    x, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    a_from, a_to = 0.05, 0.5
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
    assert x0.abs().max() > 1  # the case the clamp is for
    clipped = ddim_step(x, eps, a_from, a_to, clip=True)
    # by hand: x0 clamped, eps re-derived from x and the clamped x0, then the DDIM update
    x0c = x0.clamp(-1, 1)
    eps_c = (x - a_from**0.5 * x0c) / (1 - a_from) ** 0.5
    torch.testing.assert_close(clipped, a_to**0.5 * x0c + (1 - a_to) ** 0.5 * eps_c)
    inside = a_from**0.5 * torch.rand(3, 1, 4, 4, generator=g) + (1 - a_from) ** 0.5 * eps  # x0 in [0, 1]
    torch.testing.assert_close(
        ddim_step(inside, eps, a_from, a_to, clip=True), ddim_step(inside, eps, a_from, a_to)
    )


def test_a_diffusion_model_with_classes_the_classifier_lacks_is_warned_about(root, tmp_path):
    """An open-set split's classifier protected by a model of every class: the unused classes may be the near
    OOD, which the diffusion model has then seen; the warning says so and what to do."""
    from lightning_ood.methods import Classifier, DiffGuard

    torch.manual_seed(0)
    two = save_method(Classifier(backbone="test_resnet", num_classes=2, in_chans=1), tmp_path / "two.ckpt")
    settings = {"in_chans": 1, "t_star": 60, "steps": 3, "input_mean": [0.5], "input_std": [0.5]}
    settings |= {"detectors": [Energy()], "combine_with": None}
    with pytest.warns(
        UserWarning, match=r"has 3 classes, .* use only 2 of them \(unused: \[2\]\).*ID classes only"
    ):
        DiffGuard(two, str(root / "diffusion.ckpt"), num_classes=2, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class used: no warning
        DiffGuard(
            str(root / "classifier.ckpt"), str(root / "diffusion.ckpt"), num_classes=CLASSES, **settings
        )
