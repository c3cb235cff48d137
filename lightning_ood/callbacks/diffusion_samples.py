"""A grid of class-conditional samples of a diffusion model every few epochs, so users see what it learned."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import save_image

from lightning_ood.callbacks.run_dir import run_dir


class DiffusionSamples(Callback):
    """After every ``every_n_epochs``-th validation (and after the last epoch), writes ``samples/epoch_NNN.png``
    into the run directory (or ``output_dir``): one row per class, ``per_class`` DDIM samples each, from the same
    seeded noise every time; logged to W&B as ``samples`` images.

    Works with a method that has ``sample(labels, steps, guidance_scale, seed, image_size)`` and
    ``hparams.num_classes`` (:class:`~lightning_ood.methods.diffusion.DiffusionModel`).

    Args:
        every_n_epochs: draw after every n-th epoch.
        per_class: samples per class (the grid's columns).
        steps: DDIM steps.
        guidance_scale: classifier-free guidance scale (1 = the plain conditional model).
        seed: seed of the noise.
        output_dir: where to write (default: the run's log directory).
    """

    def __init__(
        self,
        every_n_epochs: int = 2,
        per_class: int = 8,
        steps: int = 50,
        guidance_scale: float = 2.0,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> None:
        if every_n_epochs < 1 or per_class < 1 or steps < 1:
            raise ValueError(
                "DiffusionSamples every_n_epochs, per_class and steps must be >= 1, got "
                f"{every_n_epochs}, {per_class}, {steps}"
            )
        self.every_n_epochs = every_n_epochs
        self.per_class = per_class
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.output_dir = output_dir
        self.paths: list[Path] = []

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        directory = Path(self.output_dir) if self.output_dir else run_dir(trainer)  # collective
        if not trainer.is_global_zero:
            return
        if not hasattr(pl_module, "sample"):
            raise TypeError(f"DiffusionSamples needs a diffusion model, got {type(pl_module).__name__}")
        classes = int(pl_module.hparams.num_classes)
        labels = torch.arange(classes).repeat_interleave(self.per_class)
        datamodule = trainer.datamodule
        size = getattr(datamodule, "image_size", None)
        was_training = pl_module.training
        pl_module.eval()
        images = pl_module.sample(labels, self.steps, self.guidance_scale, self.seed, image_size=size)
        pl_module.train(was_training)
        path = directory / "samples" / f"epoch_{epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((images.float().cpu() + 1) / 2, path, nrow=self.per_class, padding=1, pad_value=1.0)
        self.paths.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], caption=[f"epoch {epoch}"])
