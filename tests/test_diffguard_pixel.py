"""DiffGuard's classifier-guided pixel setting, per image (preset ``cg_pixel_adaptive``): the adaptive early stop of
the inversion against a brute-force walk, per-image start levels of the regeneration against each image alone,
the cut-outs against index arithmetic and their guidance against a sum of per-crop gradients, and what the
early stop does on the exactly known problem of tests/analytic_diffusion.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from analytic_diffusion import SIZE, prototypes, samples
from diffusion_helpers import tiny_denoiser
from test_diffguard_presets import MEANS, MeanAbsolute, analytic_diffguard, aurocs

from lightning_ood.methods.diffguard_pixel import (
    CUTOUT_MIN_FRACTION,
    REFERENCE_PSNR_OFFSET_DB,
    apply_cutouts,
    classifier_guidance,
    cutout_boxes,
    early_stop_rule,
)
from lightning_ood.methods.diffguard_presets import DDPM_LINEAR, LDM_SCHEDULE, resolve
from lightning_ood.nets.ddim import ddim_invert_until, ddim_regenerate, ddim_step, ddim_timesteps

LINEAR = DDPM_LINEAR.alphas_cumprod()


def test_reference_psnr_offset_is_its_peak_255_on_images_in_minus_one_one():
    # the reference's 20 log10(255 / rmse) on [-1, 1] images against 10 log10(1 / mse) on the same images in [0, 1]
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=g) * 2 - 1, torch.rand(50, generator=g) * 2 - 1
    reference = 20 * math.log10(255 / float((a - b).pow(2).mean().sqrt()))
    ours = 10 * math.log10(1 / float(((a - b) / 2).pow(2).mean()))
    assert reference - ours == pytest.approx(REFERENCE_PSNR_OFFSET_DB, abs=1e-3)
    assert resolve("cg_pixel_adaptive", {}, LINEAR).early_stop_psnr == pytest.approx(48.5 - 42.11, abs=0.01)


def test_early_stop_levels_equal_a_brute_force_walk_and_batch_equals_one_image_at_a_time():
    den = tiny_denoiser()
    x = torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    timesteps = ddim_timesteps(90, 9)
    threshold = 22.0  # on this tiny model the six images cross it at t = 60, 70 or 80
    rule = early_stop_rule(x, lambda z: z, threshold)
    with torch.no_grad():
        z_stop, level = ddim_invert_until(den, x, timesteps, rule)
    # brute force: each image alone, every level, numpy PSNR, the first level below the threshold
    a = den.alphas_cumprod
    for i in range(len(x)):
        z, expected, at_expected = x[i : i + 1], len(timesteps) - 1, None
        for k, (t0, t1) in enumerate(itertools.pairwise(timesteps), start=1):
            with torch.no_grad():
                eps = den.noise(z, torch.tensor([t0]), None)
            z = ddim_step(z, eps, float(a[t0]), float(a[t1]))
            mse = np.mean(((z.numpy() - x[i : i + 1].numpy()) / 2) ** 2)
            if k < len(timesteps) - 1 and 10 * np.log10(1 / mse) < threshold:
                expected, at_expected = k, z
                break
        assert int(level[i]) == expected, i
        torch.testing.assert_close(z_stop[i : i + 1], at_expected if at_expected is not None else z)
    assert len(set(level.tolist())) > 1  # the batch really mixes stop levels
    # the regeneration from per-image levels: each image takes only the steps below its own level
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        batched = ddim_regenerate(den, z_stop, timesteps, labels, 2.0, start=level)
        for i in range(len(x)):
            own = timesteps[: int(level[i]) + 1]
            alone = ddim_regenerate(den, z_stop[i : i + 1], own, labels[i : i + 1], 2.0)
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_cutouts_are_square_crops_resized_back_by_nearest_neighbour():
    boxes = cutout_boxes(steps=5, count=8, height=16, width=12, seed=3)
    assert len(boxes) == 5 and all(len(step) == 8 for step in boxes)
    low = round(CUTOUT_MIN_FRACTION * 12)
    for side, top, left in itertools.chain.from_iterable(boxes):
        assert low <= side <= 12 and 0 <= top <= 16 - side and 0 <= left <= 12 - side
    assert len({b for step in boxes for b in step}) > 8  # drawn, not one box repeated
    assert cutout_boxes(5, 8, 16, 12, seed=3) == boxes  # seeded
    images = torch.randn(2, 3, 16, 12)
    crops = apply_cutouts(images, boxes[0][:2])
    assert crops.shape == (4, 3, 16, 12)
    for j, (side, top, left) in enumerate(boxes[0][:2]):
        rows = [top + (r * side) // 16 for r in range(16)]  # nearest: floor(dst * in / out)
        cols = [left + (c * side) // 12 for c in range(12)]
        expected = images[:, :, rows][:, :, :, cols]
        torch.testing.assert_close(crops[2 * j : 2 * j + 2], expected)


def test_guidance_over_cutouts_is_the_sum_of_each_crops_gradient():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(3, SIZE * SIZE, generator=g)

    def classify(x):
        return x.flatten(1) @ weight.T

    z, eps = torch.randn(2, 1, SIZE, SIZE, generator=g), torch.randn(2, 1, SIZE, SIZE, generator=g)
    preds, alpha, scale = torch.tensor([2, 0]), 0.3, 3.0
    boxes = cutout_boxes(1, 4, SIZE, SIZE, seed=5)[0]
    guided = classifier_guidance(classify, lambda v: v, preds, scale, {500: boxes})
    out = guided(z, torch.tensor([500, 500]), eps, alpha)
    f = (1 - alpha) ** 0.5
    total = torch.zeros_like(z)
    for box in boxes:  # one crop at a time, through autograd
        x = z.clone().requires_grad_(True)
        blend = f * (x - f * eps) / alpha**0.5 + (1 - f) * x
        log_p = classify(apply_cutouts(blend, [box])).log_softmax(1).gather(1, preds.view(-1, 1)).sum()
        total += torch.autograd.grad(log_p, x)[0]
    torch.testing.assert_close(out, eps - scale * f * total)
    # only some rows regenerating at this step: their predictions are the ones guided towards
    part = guided(z[1:], torch.tensor([500]), eps[1:], alpha, rows=torch.tensor([1]))
    torch.testing.assert_close(part, out[1:])


def test_dists_criterion_stops_where_the_similarity_falls_below_its_threshold():
    x = torch.zeros(3, 1, 64, 64)
    z = torch.stack([torch.full((1, 64, 64), v) for v in (0.1, 0.5, 3.0)])  # the last is clamped to 1
    rule = early_stop_rule(x, lambda v: v, None, dists_threshold=0.8, dists=MeanAbsolute())
    # 1 - mean |(z+1)/2 - 1/2| = 0.95, 0.75, 0.5
    assert rule(z, torch.arange(3)).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="needs the DISTS metric"):
        early_stop_rule(x, lambda v: v, None, dists_threshold=0.5)


def test_adaptive_preset_settings_and_errors(tmp_path, monkeypatch):
    adaptive = resolve("cg_pixel_adaptive", {}, LINEAR)
    assert (adaptive.cutouts, adaptive.t_star, adaptive.steps, adaptive.early_stop) == (8, 900, 90, True)
    plain = resolve("cg_pixel", {}, LINEAR)
    assert (plain.cutouts, plain.early_stop_psnr, plain.early_stop) == (0, None, False)
    assert not resolve("cg_pixel_adaptive", {"early_stop_psnr": 0}, LINEAR).early_stop
    assert resolve("cg_pixel_adaptive", {"guidance": "classifier_free"}, LINEAR).cutouts == 0  # goes with it
    with pytest.raises(ValueError, match="cutouts crops the classifier-guidance input"):
        resolve("cfg_latent", {"cutouts": 4}, LDM_SCHEDULE.alphas_cumprod())
    with pytest.raises(ValueError, match=r"cutouts must be an int >= 0"):
        resolve("cg_pixel", {"cutouts": -1}, LINEAR)
    with pytest.raises(ValueError, match=r"early_stop_dists is a 1 - DISTS similarity"):
        resolve("cg_pixel", {"early_stop_dists": 2.0}, LINEAR)
    dg = analytic_diffguard(tmp_path, monkeypatch, LINEAR, preset="cg_pixel_adaptive")
    x = samples(MEANS, 2, seed=6)[0]
    with torch.no_grad():
        regen = dg.regenerate(x)
        single = torch.cat([dg.regenerate(x[i : i + 1]).regenerated for i in range(len(x))])
    assert regen.t_stop is not None and set(regen.t_stop.tolist()) <= set(dg.timesteps[1:])
    torch.testing.assert_close(regen.regenerated, single, rtol=1e-4, atol=1e-5)


def test_on_the_exact_problem_the_early_stop_lets_ood_images_stop_almost_at_once(tmp_path, monkeypatch):
    # What the adaptive early stop does with an exact denoiser: it explains an OOD image as a prototype plus a
    # large noise, so its DDIM inversion drifts off the input within a few steps and stops there (t about 80),
    # while ID images keep going (t about 700). Regenerated from t = 80, OOD images come back almost unchanged
    # under any label, so every score ranks them as *more* ID than the ID images: AUROC near 0 (docs/diffguard.md,
    # "Presets"). Without the early stop the same problem separates (AUROC >= 0.9, test_diffguard_presets).
    dg = analytic_diffguard(tmp_path, monkeypatch, LINEAR, error=1e-3, preset="cg_pixel_adaptive")
    ood = torch.cat([
        samples(prototypes(7, 4), 5, seed=2)[0],
        torch.rand(20, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1,
    ])  # fmt: skip
    x_id = samples(MEANS, 20, seed=1)[0]
    with torch.no_grad():
        t_id, t_ood = (dg.regenerate(x).t_stop.double().mean() for x in (x_id, ood))
    assert t_ood < 150 < 500 < t_id, (t_id, t_ood)
    assert max(aurocs(dg).values()) < 0.5
