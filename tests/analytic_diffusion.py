"""An exactly known diffusion problem for DiffGuard's mechanism test: ID images are ``K`` class prototypes plus
small Gaussian noise, the denoiser predicts the noise *exactly* for that data distribution, and the protected
classifier is the nearest prototype.

Data: class ``k`` is ``x0 ~ N(mu_k, s^2 I)``, classes equally likely. Noised, ``x_t = sqrt(a) x0 + sqrt(1 - a)
eps`` (``a = bar alpha_t``) is ``N(sqrt(a) mu_k, v I)`` per class with ``v = a s^2 + 1 - a``, so the MMSE noise
prediction (Tweedie) is ``E[eps | x_t, y] = sqrt(1 - a) (x_t - sqrt(a) sum_k w_k mu_k) / v``, with ``w`` one-hot
on ``y`` for a label and the posterior ``softmax_k(-|x_t - sqrt(a) mu_k|^2 / 2v)`` for the null class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.contract import ModelOutputs
from lightning_ood.nets.diffusion import Denoiser

SIZE, CLASSES, NOISE_STD, AMPLITUDE = 8, 3, 0.1, 0.7


def prototypes(seed: int, n: int = CLASSES) -> Tensor:
    """``[n, 1, SIZE, SIZE]`` random +-AMPLITUDE patterns."""
    g = torch.Generator().manual_seed(seed)
    return AMPLITUDE * (torch.randint(0, 2, (n, 1, SIZE, SIZE), generator=g).float() * 2 - 1)


def samples(means: Tensor, per_mean: int, seed: int) -> tuple[Tensor, Tensor]:
    """``per_mean`` images ``mu + NOISE_STD n`` around each mean, and their mean's index."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(means)).repeat_interleave(per_mean)
    return means[labels] + NOISE_STD * torch.randn(len(labels), *means.shape[1:], generator=g), labels


class MixtureDenoiser(Denoiser):
    """The exact noise prediction of the prototype mixture (module doc), class-conditional with a null class."""

    def __init__(self, means: Tensor, alphas_cumprod: Tensor, error: float = 0.0) -> None:
        super().__init__(alphas_cumprod, num_classes=len(means), name="analytic")
        self.register_buffer("means", means.double())
        self.error = error
        g = torch.Generator().manual_seed(99)
        offsets = torch.randn(len(alphas_cumprod), *means.shape[1:], generator=g, dtype=torch.float64)
        self.register_buffer("offsets", offsets)

    def predict_noise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        var = a * NOISE_STD**2 + 1 - a
        xd = x.double().unsqueeze(1)  # [B, 1, C, H, W]
        centres = a.sqrt() * self.means.unsqueeze(0)  # [B, K, C, H, W]
        log_w = -(xd - centres).pow(2).flatten(2).sum(2) / (2 * var.view(-1, 1))
        weights = log_w.softmax(dim=1)
        if labels is not None:
            chosen = labels < self.num_classes
            one_hot = torch.nn.functional.one_hot(labels.clamp(max=self.num_classes - 1), self.num_classes)
            weights = torch.where(chosen.view(-1, 1), one_hot.double(), weights)
        mean = (weights.view(*weights.shape, 1, 1, 1) * centres).sum(1)
        eps = (1 - a.squeeze(1)).sqrt() * (x.double() - mean) / var.squeeze(1)
        return (eps + self.error * self.offsets[t]).to(x.dtype)


class PrototypeNet(nn.Module):
    """Nearest prototype as a CNN-shaped classifier: feature map ``A_k = x * mu_k`` (``[B, K, H, W]``), pooled by
    summing, head ``logits_k = (mu_k . x - |mu_k|^2 / 2) / tau`` (the argmax is the nearest prototype)."""

    def __init__(self, means: Tensor, tau: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("means", means.float())
        self.head = nn.Linear(len(means), len(means))
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(len(means)) / tau)
            self.head.bias.copy_(-means.flatten(1).pow(2).sum(1) / (2 * tau))

    def forward_features(self, x: Tensor) -> Tensor:
        return x * self.means.squeeze(1).unsqueeze(0)

    def pool(self, feature_map: Tensor) -> Tensor:
        return feature_map.sum(dim=(2, 3))

    def forward(self, x: Tensor) -> ModelOutputs:
        features = self.pool(self.forward_features(x))
        return ModelOutputs(logits=self.head(features), features=features)


class PrototypeClassifier(nn.Module):
    """The part of a lightning-ood classifier method that DiffGuard uses, around :class:`PrototypeNet`."""

    classifies = True

    def __init__(self, means: Tensor) -> None:
        super().__init__()
        self.net = PrototypeNet(means)
        self.hparams = {"num_classes": len(means)}
        self.run_config = {"backbone": "prototypes"}

    @property
    def head(self) -> nn.Linear:
        return self.net.head

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        return self.net(x)
