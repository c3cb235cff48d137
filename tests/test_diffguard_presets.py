"""DiffGuard's presets on an exactly known diffusion problem (tests/analytic_diffusion.py): every score separates
ID from OOD under each preset and loses that at the old mixed default; how a preset's depth is read on a model's
schedule; the Grad-CAM mask against its closed form; the L1 logits distance; the perceptual distances' loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analytic_diffusion import SIZE, MixtureDenoiser, PrototypeClassifier, prototypes, samples
from diffusers import DDPMScheduler
from sklearn.metrics import roc_auc_score

import lightning_ood.methods.diffguard as diffguard_module
from lightning_ood.detectors import Energy
from lightning_ood.frozen import freeze
from lightning_ood.methods.diffguard_cam import grad_cam
from lightning_ood.methods.diffguard_presets import DDPM_LINEAR, LDM_SCHEDULE, resolve
from lightning_ood.methods.diffguard_scores import similarity_scores
from lightning_ood.nets.ddim import guided_noise

COSINE = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
MEANS = prototypes(0)


def analytic_diffguard(tmp_path, monkeypatch, alphas, error: float = 0.0, **settings):
    """DiffGuard around the nearest-prototype classifier and the exact mixture denoiser on ``alphas``."""
    sources = [tmp_path / "classifier.ckpt", tmp_path / "diffusion.ckpt"]
    for path in sources:
        path.write_bytes(b"analytic")  # registered by path and hash like real checkpoints
    monkeypatch.setattr(diffguard_module, "load_method", lambda path: freeze(PrototypeClassifier(MEANS)))
    monkeypatch.setattr(
        diffguard_module, "load_denoiser", lambda path, w: (MixtureDenoiser(MEANS, alphas, error), sources[1])
    )
    settings = {"combine_with": None, **settings}
    return diffguard_module.DiffGuard(
        str(sources[0]), str(sources[1]), num_classes=len(MEANS), in_chans=1, input_mean=[0.5], input_std=[0.5],
        detectors=[Energy()], **settings,
    ).eval()  # fmt: skip


def aurocs(dg) -> dict[str, float]:
    """AUROC (OOD positive) of every DiffGuard score: 60 ID images (3 prototypes + noise) against 20 images of
    4 unseen patterns and 20 uniform-noise images."""
    ood_patterns, _ = samples(prototypes(7, 4), 5, seed=2)
    noise = torch.rand(20, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x_id, x_ood = samples(MEANS, 20, seed=1)[0], torch.cat([ood_patterns, noise])
    with torch.no_grad():
        s_id, s_ood = (dg.native_scores(dg.forward_outputs(x), x) for x in (x_id, x_ood))
    labels = np.r_[np.zeros(len(x_id)), np.ones(len(x_ood))]
    return {k: roc_auc_score(labels, torch.cat([s_id[k], s_ood[k]]).numpy()) for k in s_id}


def test_every_score_separates_under_each_preset_and_not_at_the_old_mixed_default(tmp_path, monkeypatch):
    # The denoiser is exact up to a tiny timestep-dependent error (0.1 % of the noise's scale; a trained network's
    # is two orders larger): without any error a deterministic DDIM round trip keeps the class even from
    # bar alpha = 2.4e-9, so the old default's failure needs a model that is not perfect.
    runs = {
        "cfg_latent": (LDM_SCHEDULE.alphas_cumprod(), {}),
        "cfg_latent on a cosine model": (COSINE, {}),
        "cg_pixel": (DDPM_LINEAR.alphas_cumprod(), {"preset": "cg_pixel"}),
        "old default": (
            COSINE, {"reference": "unconditional", "t_star": 1.0, "grad_cam": False},
        ),
    }  # fmt: skip
    results = {}
    for name, (alphas, settings) in runs.items():
        dg = analytic_diffguard(tmp_path, monkeypatch, alphas, error=1e-3, **settings)
        results[name] = aurocs(dg)
    assert set(results["cfg_latent"]) == {f"diffguard_{m}" for m in ("logits", "features", "l2", "ssim")}
    for name in ("cfg_latent", "cfg_latent on a cosine model", "cg_pixel"):
        assert min(results[name].values()) >= 0.9, (name, results[name])
    # the old default (full inversion on the cosine schedule, the unconditional regeneration as the reference):
    # the feature distance falls to chance (measured 0.51) and SSIM / logits lose much of their separation
    old = results["old default"]
    assert old["diffguard_features"] <= 0.6, old
    assert old["diffguard_ssim"] <= 0.85 and old["diffguard_logits"] <= 0.88, old


def test_a_presets_depth_follows_the_models_schedule(tmp_path, monkeypatch):
    ldm, linear = LDM_SCHEDULE.alphas_cumprod(), DDPM_LINEAR.alphas_cumprod()
    same = resolve("cfg_latent", {}, ldm)
    assert (same.t_star, same.steps, same.reference, same.guidance_scale) == (961, 25, "input", 10.0)
    assert same.t_star_from == "preset" and same.grad_cam and same.cam_threshold == 0.3
    # on a cosine model: the timestep whose bar alpha is nearest (log scale) to the preset's, by brute force
    other = resolve("cfg_latent", {}, COSINE)
    target = float(ldm[961])
    brute = min(range(1, 1000), key=lambda t: abs(np.log(float(COSINE[t])) - np.log(target)))
    assert other.t_star == brute == 988 and other.t_star_from == "preset, matched bar alpha"
    assert abs(np.log(other.alpha_star / target)) < 0.05
    pixel = resolve("cg_pixel", {}, linear)
    assert (pixel.t_star, pixel.steps, pixel.guidance, pixel.reference) == (
        900,
        90,
        "classifier",
        "unconditional",
    )
    assert pixel.clip_inversion and not pixel.grad_cam
    # a user's t_star: an int is a timestep of the model, a float a fraction of its schedule
    assert resolve("cfg_latent", {"t_star": 500}, COSINE).t_star == 500
    assert resolve("cfg_latent", {"t_star": 0.5}, COSINE).t_star == 500
    assert resolve("cfg_latent", {"t_star": 1.0}, COSINE).t_star == 999
    assert not resolve("cfg_latent", {"guidance": "classifier"}, COSINE).grad_cam  # the mask goes with cfg
    with pytest.raises(ValueError, match=r"fraction of the schedule and must be in \(0, 1\]"):
        resolve("cfg_latent", {"t_star": 1.5}, COSINE)
    with pytest.raises(ValueError, match="steps must be in"):
        resolve("cfg_latent", {"t_star": 10}, COSINE)
    with pytest.raises(ValueError, match="grad_cam masks classifier-free guidance"):
        resolve("cfg_latent", {"guidance": "classifier", "grad_cam": True}, COSINE)
    with pytest.raises(ValueError, match="preset must be one of"):
        resolve("ldm", {}, COSINE)
    dg = analytic_diffguard(tmp_path, monkeypatch, COSINE, t_star=0.25, steps=5)
    assert dg.timesteps == [0, 50, 100, 150, 200, 250]


def test_grad_cam_mask_against_its_closed_form_and_the_masked_guidance():
    # PrototypeNet: A_k = x * mu_k, logits = sum_hw A / tau + b, so d logit_y / d A_k = [k = y] / tau everywhere:
    # alpha_y = 1 / tau, the others 0, and the map is ReLU(x * mu_y) scaled to [0, 1] per image
    net = PrototypeClassifier(MEANS).net
    x, classes = samples(MEANS, 2, seed=4)[0], torch.tensor([0, 2, 1, 1, 2, 0])
    expected = (x * MEANS[classes]).relu()
    low, high = expected.amin((2, 3), keepdim=True), expected.amax((2, 3), keepdim=True)
    torch.testing.assert_close(grad_cam(net, x, classes), (expected - low) / (high - low + 1e-7))
    # guidance inside the mask, the unconditional noise outside
    den = MixtureDenoiser(MEANS, COSINE)
    z, labels = torch.randn(6, 1, SIZE, SIZE), torch.tensor([0, 1, 2, 0, 1, 2])
    mask = (torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    guided, plain = guided_noise(den, z, 500, labels, 10.0), guided_noise(den, z, 500, None, 1.0)
    torch.testing.assert_close(
        guided_noise(den, z, 500, labels, 10.0, mask), torch.where(mask > 0.5, guided, plain)
    )


def test_logits_distance_is_l1_as_the_reference_code():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    images = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    scores = similarity_scores(a, None, images, b, None, images.flip(-1))
    np.testing.assert_allclose(
        scores["diffguard_logits"].numpy(), np.abs(a.numpy() - b.numpy()).sum(1), rtol=1e-6
    )


class MeanAbsolute(torch.nn.Module):
    """A stand-in for piq's DISTS (whose VGG16 weights are not here): mean |x - y| per image."""

    def forward(self, x, y):
        assert x.shape[1] == 3 and min(x.shape[-2:]) >= 64 and 0 <= float(x.min()) <= float(x.max()) <= 1
        return (x - y).abs().flatten(1).mean(1)


def test_perceptual_distances_are_scores_and_say_what_weights_they_need(tmp_path, monkeypatch):
    import piq

    monkeypatch.setattr(piq, "DISTS", lambda reduction: MeanAbsolute())
    dg = analytic_diffguard(
        tmp_path, monkeypatch, COSINE, t_star=100, steps=2, perceptual=["dists"], combine_with="energy",
        combine_measure="dists",
    )  # fmt: skip
    assert "diffguard_dists" in dg.native_score_names and dg.state_dict() == {}
    x = samples(MEANS, 1, seed=8)[0]
    with torch.no_grad():
        regen = dg.regenerate(x)
        got = dg.similarity(x, regen.preds)["diffguard_dists"]
    up = [
        torch.nn.functional.interpolate((im + 1) / 2, size=(64, 64), mode="bilinear")
        for im in (x, regen.regenerated)
    ]
    torch.testing.assert_close(
        got, (up[0] - up[1]).abs().flatten(1).mean(1)
    )  # grey -> RGB does not change it
    # offline without the cached weights: a clear error naming the files and the folder
    monkeypatch.undo()
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"lpips_weights\.pt.*hub/checkpoints.*no network"):
        analytic_diffguard(tmp_path, monkeypatch, COSINE, t_star=100, steps=2, perceptual=["lpips"])
