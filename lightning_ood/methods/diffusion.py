"""A class-conditional DDPM (Ho et al., NeurIPS 2020) on ``diffusers``, trained on any ID data config: the
diffusion model that :class:`~lightning_ood.methods.diffguard.DiffGuard` regenerates images with.

Training: noise prediction (``|| eps - eps_theta(sqrt(bar alpha_t) x + sqrt(1 - bar alpha_t) eps, t, y) ||^2``,
``t`` uniform), with the label replaced by the null class with probability ``label_dropout`` so the same network
is also unconditional (classifier-free guidance, Ho & Salimans 2022), optionally an exponential moving average
of the weights (used for validation, sampling and DiffGuard). The best checkpoint is the lowest ``val/loss``
(a fixed, seeded draw of timesteps and noise per validation batch, so epochs are comparable).

Testing: it is not a classifier (no logits, no ``id_acc``). Its own score ``denoising_error`` is the mean
squared noise-prediction error at a few fixed timesteps with one fixed noise image (unconditional branch);
higher = more OOD. It is a plain generative baseline, not DiffGuard.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ood.contract import ModelOutputs
from lightning_ood.detectors.base import Detector
from lightning_ood.methods.base import OODMethod
from lightning_ood.methods.input_norm import InputNormalisation
from lightning_ood.nets.ddim import ddim_sample
from lightning_ood.nets.diffusion import UNetDenoiser, class_conditional_unet, crop_to, pad_to
from lightning_ood.optim import configure_optimizers


class DiffusionModel(InputNormalisation, OODMethod):
    """Class-conditional noise-prediction diffusion model (module doc).

    Args:
        num_classes, in_chans: linked from the data.
        sample_size: the UNet's input size; smaller images are padded to it by repeating their border (28 px
            Fashion-MNIST -> 32 px) and cropped back.
        block_out_channels, layers_per_block, attention_levels, norm_num_groups: the UNet
            (:func:`~lightning_ood.nets.diffusion.class_conditional_unet`).
        num_train_timesteps, beta_schedule: the ``diffusers.DDPMScheduler`` noise schedule.
        label_dropout: probability of training a sample with the null class (classifier-free guidance).
        ema_decay: decay of the weights' moving average (``None``: no EMA; the raw weights are used).
        score_timesteps: timesteps of the ``denoising_error`` test score.
        input_mean, input_std: normalisation of the batches (``None``: the data config's); images are mapped to
            ``[-1, 1]`` from it.
        optimizer / scheduler / scheduler_interval: injected by the config.
        detectors: library detectors (only those reading the input images apply; default none).
    """

    method_name = "diffusion"
    checkpoint_monitor = ("val/loss", "min")

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        sample_size: int = 32,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_levels: Sequence[int] = (),
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2",
        label_dropout: float = 0.1,
        ema_decay: float | None = 0.999,
        score_timesteps: Sequence[int] = (50, 200, 500),
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "step",
        detectors: Sequence[Detector] | None = None,
        detector_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["detectors"])
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"DiffusionModel.label_dropout must be in [0, 1), got {label_dropout}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"DiffusionModel.ema_decay must be in (0, 1) or null, got {ema_decay}")
        bad = [t for t in score_timesteps if not 0 <= t < num_train_timesteps]
        if bad or not score_timesteps:
            raise ValueError(
                f"DiffusionModel.score_timesteps must be a non-empty list in [0, {num_train_timesteps}), "
                f"got {list(score_timesteps)}"
            )
        self.unet = class_conditional_unet(
            num_classes, in_chans, sample_size, tuple(block_out_channels), layers_per_block,
            tuple(attention_levels), norm_num_groups,
        )  # fmt: skip
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False) if ema_decay is not None else None
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule
        )
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        # one fixed noise image for the test score, the same for every image and batch size
        noise = torch.randn(in_chans, sample_size, sample_size, generator=torch.Generator().manual_seed(0))
        self.register_buffer("score_noise", noise, persistent=False)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.init_detectors(list(detectors) if detectors is not None else [], detector_cache)

    # -- the contract ----------------------------------------------------------------------------------------
    @property
    def classifies(self) -> bool:
        return False

    @property
    def provides(self) -> frozenset[str]:
        return frozenset({"inputs"})  # no logits, no features: only detectors reading the images apply

    @property
    def native_score_names(self) -> tuple[str, ...]:
        return ("denoising_error",)

    @property
    def run_config(self) -> dict[str, Any]:
        widths = "-".join(str(c) for c in self.unet.config.block_out_channels)
        return {"method": self.method_name, "backbone": f"unet{widths}"}

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """``[B, C, H, W]`` normalised images -> ``extras["denoising_error"]`` ``[B]`` (no logits, no features)."""
        z = pad_to(self.to_unit(x), self.hparams.sample_size)
        net = self.sampling_unet
        errors = []
        for t in self.hparams.score_timesteps:
            a = self.alphas_cumprod[t]
            noise = self.score_noise.expand_as(z)
            noisy = a.sqrt() * z + (1 - a).sqrt() * noise
            tt = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            null = torch.full_like(tt, self.hparams.num_classes)
            errors.append((net(noisy, tt, class_labels=null).sample - noise).pow(2).flatten(1).mean(1))
        return ModelOutputs(extras={"denoising_error": torch.stack(errors).mean(0)})

    def native_scores(self, outputs: ModelOutputs, inputs: Tensor) -> dict[str, Tensor]:
        return {"denoising_error": outputs.extras["denoising_error"]}

    # -- pixels ----------------------------------------------------------------------------------------------
    def to_unit(self, x: Tensor) -> Tensor:
        """Normalised batches -> images in ``[-1, 1]``."""
        mean, std = self.input_normalisation(x)
        return (x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)) * 2 - 1

    @property
    def sampling_unet(self) -> torch.nn.Module:
        """The EMA weights when kept, else the trained ones."""
        return self.ema_unet if self.ema_unet is not None else self.unet

    def denoiser(self, weights: Literal["ema", "raw"] = "ema") -> UNetDenoiser:
        """The network with this model's noise schedule, as DiffGuard uses it: the moving average of the weights
        (``"ema"``, when kept; else the trained weights) or the trained weights (``"raw"``)."""
        if weights not in ("ema", "raw"):
            raise ValueError(f"DiffusionModel.denoiser weights must be 'ema' or 'raw', got {weights!r}")
        unet = self.unet if weights == "raw" else self.sampling_unet
        return UNetDenoiser(unet, self.alphas_cumprod, name=self.run_config["backbone"])

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int = 0,
        image_size: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Class-conditional DDIM samples ``[N, C, S, S]`` in ``[-1, 1]`` (clamped), cropped to ``image_size``."""
        den = self.denoiser()
        size, channels = self.hparams.sample_size, self.hparams.in_chans
        generator = torch.Generator().manual_seed(seed)
        z = ddim_sample(
            den, (len(labels), channels, size, size), labels.to(self.device), steps, guidance_scale,
            generator, progress,
        )  # fmt: skip
        if image_size is not None:
            z = crop_to(z, image_size, image_size)
        return z.clamp(-1, 1)

    # -- training --------------------------------------------------------------------------------------------
    def diffusion_loss(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None, drop: bool = True
    ) -> Tensor:
        """Mean squared noise-prediction error of one batch (labels dropped to the null class if ``drop``)."""
        net = self.unet if generator is None else self.sampling_unet
        z = pad_to(self.to_unit(images), self.hparams.sample_size)
        n, device = len(z), z.device
        t = torch.randint(0, self.hparams.num_train_timesteps, (n,), generator=generator).to(device)
        noise = torch.randn(z.shape, generator=generator).to(device)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(z.dtype)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        labels = labels.clone()
        if drop and self.hparams.label_dropout > 0:
            dropped = torch.rand(n, generator=generator).to(device) < self.hparams.label_dropout
            labels[dropped] = self.hparams.num_classes
        return F.mse_loss(net(noisy, t, class_labels=labels).sample, noise)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        loss = self.diffusion_loss(images, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        # the same timesteps, noise and dropped labels for this batch in every epoch
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        loss = self.diffusion_loss(images, targets, generator=generator)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(images))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema_unet is None:
            return
        step = self.global_step
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            for ema, p in zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True):
                ema.lerp_(p.detach(), 1.0 - decay)
            for ema, b in zip(self.ema_unet.buffers(), self.unet.buffers(), strict=True):
                ema.copy_(b)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.optimizer, self.scheduler, self.hparams.scheduler_interval)
