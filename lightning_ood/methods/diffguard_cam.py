"""The Grad-CAM mask of DiffGuard's classifier-free setting: classifier-free guidance is applied only where the
protected classifier looks for the predicted class, elsewhere the step follows the unconditional noise.

Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2) on the classifier's last feature map ``A`` (``[B, K, h, w]``):
``alpha_k = mean_{hw} d logit_y / d A_k``, ``cam = ReLU(sum_k alpha_k A_k)``, upsampled (bilinear) to the image
size and scaled to ``[0, 1]`` per image (min-max); the mask is ``cam > threshold`` (0.3 in the reference code's
latent setting, where guidance is kept inside the mask and the unconditional noise is used outside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cam_network(classifier: nn.Module) -> nn.Module:
    """The network of a lightning-ood classifier method that exposes ``forward_features`` (the last feature map),
    ``pool`` and ``head`` (a :class:`~lightning_ood.nets.timm_net.TimmNet`: ``Classifier.net``, ``SSOD.net.backbone``).

    Raises:
        ValueError: the classifier has no such network.
    """
    net = getattr(classifier, "net", None)
    for candidate in (net, getattr(net, "backbone", None)):
        if candidate is not None and all(hasattr(candidate, a) for a in ("forward_features", "pool", "head")):
            return candidate
    raise ValueError(
        f"DiffGuard.grad_cam needs the protected classifier's last feature map, but a {type(classifier).__name__} "
        "has no network with forward_features / pool / head (a Classifier or SSOD checkpoint has); set "
        "model.init_args.grad_cam: false"
    )


def grad_cam(net: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """``[B, 1, H, W]`` Grad-CAM maps in ``[0, 1]`` of normalised ``images`` ``[B, C, H, W]`` for ``classes`` ``[B]``.

    The gradient runs through the classifier's pooling and head only (the feature map is a leaf), so it is one
    forward pass of the network and a cheap backward pass.
    """
    with torch.inference_mode(False), torch.enable_grad():
        fmap = net.forward_features(images.detach().clone())
        if fmap.ndim != 4:
            raise ValueError(
                f"DiffGuard.grad_cam needs a [B, C, h, w] feature map; the classifier gives {tuple(fmap.shape)} (a "
                "ViT's tokens?): set model.init_args.grad_cam: false"
            )
        fmap = fmap.detach().float().requires_grad_(True)
        logits = net.head(net.pool(fmap))
        chosen = logits.gather(1, classes.view(-1, 1).clone()).sum()
        (grad,) = torch.autograd.grad(chosen, fmap)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = (weights * fmap.detach()).sum(dim=1, keepdim=True).relu()
    cam = F.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    low, high = cam.amin(dim=(2, 3), keepdim=True), cam.amax(dim=(2, 3), keepdim=True)
    return (cam - low) / (high - low + 1e-7)


def grad_cam_mask(net: nn.Module, images: Tensor, classes: Tensor, threshold: float) -> Tensor:
    """``[B, 1, H, W]`` float mask, 1 where the Grad-CAM map of ``classes`` exceeds ``threshold``."""
    return (grad_cam(net, images, classes) > threshold).float()


__all__ = ["cam_network", "grad_cam", "grad_cam_mask"]
