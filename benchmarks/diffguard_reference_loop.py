"""DiffGuard for one image at a time, doing per image the work the reference code (github.com/cure-lab/DiffGuard)
does per image: the batch-size-1 side of ``benchmarks/diffguard_speed.py``. It computes the same scores as
``DiffGuard`` (the benchmark checks that), with the reference code's pattern of network calls:

- the classifier runs on the input twice (the prediction, then logits and features for the comparison), then on
  the regeneration and on the reference;
- inversion: one unconditional network call per DDIM step;
- classifier-free guidance (its latent-diffusion back-end): the guided regeneration evaluates the conditional
  and the unconditional branch in one call on a batch of 2 per step; the unconditional reference regeneration
  runs afterwards as a second loop of calls on the single image;
- classifier guidance (its pixel back-end, whose regeneration runs one image at a time): each step evaluates the
  guided image and the unconditional reference image in one call on a batch of 2, then the guidance
  function evaluates the network again on the guided image, with autograd recording, to re-derive the
  predicted ``x0`` for the blend, and runs the classifier forward and backward on the blend.

The Grad-CAM mask (when the settings have it) and the clamped inversion (``clip_inversion``) are computed as
``DiffGuard`` computes them. What the reference code does and ``DiffGuard`` does not (cut-outs, adaptive early
stop of the inversion) is left out here too: it would change the scores, not only the cost.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from lightning_ood.methods import DiffGuard
from lightning_ood.methods.diffguard_cam import grad_cam_mask
from lightning_ood.methods.diffguard_scores import similarity_scores
from lightning_ood.nets.ddim import ddim_invert, ddim_regenerate, ddim_step


def reference_style_scores(method: DiffGuard, image: Tensor) -> dict[str, Tensor]:
    """``diffguard_<measure>`` scores ``[1]`` of one normalised image ``[1, C, H, W]`` (module doc)."""
    if len(image) != 1:
        raise ValueError(f"one image at a time, got a batch of {len(image)}")
    den, s = method.diffusion, method.settings
    shape = tuple(image.shape[1:])
    preds = method.classifier.forward_outputs(image).logits.argmax(dim=1)
    own = method.classifier.forward_outputs(image)  # the reference code's second pass over the input
    unit = method.to_unit(image)
    with torch.no_grad():
        clip = s.clip_inversion and den.clip_sample
        z_star = ddim_invert(den, den.encode(unit), method.timesteps, labels=None, clip=clip)
    with_reference = s.reference == "unconditional"
    if s.guidance == "classifier_free":
        labels, mask = method.class_map[preds], None
        if s.grad_cam:
            mask = den.encode_mask(grad_cam_mask(method._cam_net, image, preds, s.cam_threshold), z_star)
        z = ddim_regenerate(
            den, z_star, method.timesteps, labels, s.guidance_scale, clip=den.clip_sample, mask=mask
        )
        z_ref = (
            ddim_regenerate(den, z_star, method.timesteps, None, clip=den.clip_sample)
            if with_reference
            else None
        )
    else:
        z, z_ref = _classifier_guided_pair(method, z_star, preds, shape, with_reference)
    with torch.no_grad():
        regenerated = den.decode(z, shape).clamp(-1, 1)
        reference = den.decode(z_ref, shape).clamp(-1, 1) if z_ref is not None else None
    new = method.classifier.forward_outputs(method.from_unit(regenerated))
    if reference is not None:
        ref, ref_images = method.classifier.forward_outputs(method.from_unit(reference)), reference
    else:
        ref, ref_images = own, unit
    return similarity_scores(ref.logits, ref.features, ref_images, new.logits, new.features, regenerated)


def _classifier_guided_pair(
    method: DiffGuard, z_star: Tensor, preds: Tensor, shape: tuple[int, ...], with_reference: bool
) -> tuple[Tensor, Tensor | None]:
    """The guided and (optionally) the unconditional regeneration of one image, stepped together."""
    den, a = method.diffusion, method.diffusion.alphas_cumprod
    guide = method._classifier_guidance(preds, shape)
    z, z_ref = z_star, (z_star if with_reference else None)
    down = method.timesteps[::-1]
    for t_from, t_to in itertools.pairwise(down):
        a_from, a_to = float(a[t_from]), float(a[t_to])
        pair = torch.cat([z, z_ref]) if z_ref is not None else z
        t = torch.full((len(pair),), t_from, dtype=torch.long, device=z.device)
        with torch.no_grad():
            eps = den.noise(pair, t, None)
        eps_ref = eps[1:] if z_ref is not None else None
        with torch.inference_mode(False), torch.enable_grad():
            x_t = z.detach().clone().requires_grad_(True)
            eps_again = den.noise(x_t, t[:1], None)  # recorded by autograd, as in the reference's guidance
        eps_guided = guide(z, t[:1], eps_again.detach(), a_from)
        with torch.no_grad():
            z = ddim_step(z, eps_guided, a_from, a_to, den.clip_sample)
            if z_ref is not None:
                z_ref = ddim_step(z_ref, eps_ref, a_from, a_to, den.clip_sample)
    return z, z_ref
