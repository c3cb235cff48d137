"""Loading a diffusion model for DiffGuard, offline: a lightning-ood ``DiffusionModel`` checkpoint, or a local
``diffusers`` pipeline folder (``save_pretrained`` output: ``DDIMPipeline`` / ``DDPMPipeline`` pixel UNets,
``DiTPipeline`` and ``LDMPipeline`` latent models through their autoencoder)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
from torch import nn

from lightning_ood.frozen import load_method
from lightning_ood.nets.diffusion import Denoiser, LatentDenoiser, UNetDenoiser

#: Pipelines whose network works on pixels (a ``unet``) and on an autoencoder's latents (``transformer`` or
#: ``unet`` with a ``vae`` / ``vqvae``).
PIXEL_PIPELINES = ("DDIMPipeline", "DDPMPipeline")
LATENT_PIPELINES = ("DiTPipeline", "LDMPipeline")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_denoiser(source: str | Path, weights: str = "ema") -> tuple[Denoiser, Path]:
    """The denoiser in ``source`` and the file whose content identifies it (the checkpoint, or the network's
    weights file in a pipeline folder), for the frozen sub-model's hash. ``weights``: a ``DiffusionModel``
    checkpoint's moving average (``"ema"``) or trained weights (``"raw"``); a pipeline folder has one set.

    Raises:
        FileNotFoundError / ValueError: with what was found and what is accepted.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return _from_checkpoint(path, weights), path
    if path.is_dir():
        return _from_pipeline(path)
    raise FileNotFoundError(
        f"diffusion model {str(path)!r} does not exist: give a lightning-ood DiffusionModel checkpoint (.ckpt, "
        "train one with configs/diffusion_fashionmnist.yaml) or a local diffusers pipeline folder "
        "(save_pretrained output with model_index.json)"
    )


def _from_checkpoint(path: Path, weights: str) -> Denoiser:
    model = load_method(path)
    # any method that hands out a Denoiser (lightning_ood.methods.DiffusionModel); nets/ imports no method
    if not callable(getattr(model, "denoiser", None)):
        raise ValueError(
            f"{str(path)!r} is a {type(model).__name__} checkpoint, not a DiffusionModel; point "
            "model.init_args.diffusion at a diffusion checkpoint or a diffusers pipeline folder"
        )
    return model.denoiser(weights)


def _component(folder: Path, name: str, spec: list[str]) -> nn.Module:
    library, class_name = spec
    if library != "diffusers" or not hasattr(diffusers, class_name):
        raise ValueError(
            f"{folder}: component {name!r} is a {library}.{class_name}, which diffusers cannot load"
        )
    return getattr(diffusers, class_name).from_pretrained(folder / name)


def _weights_file(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no weights file ({' or '.join(_WEIGHT_FILES)})")


def _from_pipeline(folder: Path) -> tuple[Denoiser, Path]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no model_index.json: it is not a diffusers pipeline folder (save one with "
            "pipeline.save_pretrained(folder))"
        )
    index = json.loads(index_file.read_text())
    kind = index.get("_class_name", "")
    if kind not in PIXEL_PIPELINES + LATENT_PIPELINES:
        raise ValueError(
            f"{folder}: a {kind or 'unnamed'} pipeline is not supported; supported: "
            f"{', '.join(PIXEL_PIPELINES + LATENT_PIPELINES)}"
        )
    scheduler = _component(folder, "scheduler", index["scheduler"])
    alphas = scheduler.alphas_cumprod
    if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"{folder}: the scheduler's prediction_type is {scheduler.config.prediction_type!r}; DiffGuard's DDIM "
            "needs a noise-predicting (epsilon) model"
        )
    if kind in PIXEL_PIPELINES:
        unet = _component(folder, "unet", index["unet"])
        return UNetDenoiser(unet, alphas, name=f"{kind}:{folder.name}"), _weights_file(folder / "unet")
    net_name = "transformer" if "transformer" in index else "unet"
    network = _component(folder, net_name, index[net_name])
    vae_name = "vae" if "vae" in index else "vqvae"
    vae = _component(folder, vae_name, index[vae_name])
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    image_size = int(network.config.sample_size) * scale
    denoiser = LatentDenoiser(network, vae, alphas, image_size=image_size, name=f"{kind}:{folder.name}")
    return denoiser, _weights_file(folder / net_name)
