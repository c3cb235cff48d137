"""An OpenCLIP model as a frozen encoder: image embeddings before (default) or after the projection, and the text
tower for zero-shot class prompts. Needs the optional dependency ``open_clip_torch`` (``lightning-ood[clip]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.nets.encoders import Encoder, InputSpec, per_channel
from lightning_ood.nets.hub import pretrained_or_explain

#: The five prompt templates of Adaloglou et al. (TMLR 2024) for zero-shot class embeddings.
PROMPT_TEMPLATES = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a photo of many {c}.",
    "a photo of the large {c}.",
    "a photo of the small {c}.",
)

Features = Literal["pre_projection", "projected"]


def import_open_clip() -> Any:
    """The ``open_clip`` module, or an ImportError that says how to install it."""
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ClipEncoder needs open_clip, an optional dependency: pip install 'lightning-ood[clip]' "
            "(or pip install open_clip_torch)"
        ) from err
    return open_clip


class ClipEncoder(Encoder):
    """The image tower of an OpenCLIP model, frozen; ``forward`` gives ``[B, D]`` image embeddings.

    ``features="pre_projection"`` (default, as Adaloglou et al.): the pooled image token after the tower's final
    LayerNorm, *before* the image projection (``D`` = the tower's width, e.g. 768 for ViT-B/16);
    ``"projected"``: the joint image-text embedding (``D`` = ``embed_dim``, e.g. 512). :meth:`project` maps
    features to the joint space either way, so zero-shot scoring works with both. Pre-projection features exist
    for towers whose projection is a separate linear map (OpenCLIP ViTs, timm towers with a linear ``proj``).

    Weights: ``checkpoint`` (a local file, offline) or ``pretrained`` (an OpenCLIP tag such as
    ``laion2b_s34b_b88k``, downloaded once). With both, the file is loaded and the tag only names the
    preprocessing (mean / std, interpolation) the weights were trained with; with a file alone OpenCLIP's
    defaults apply (OpenAI mean / std, bicubic, shorter side resized then centre crop). ``preprocess``
    overrides any of ``size``, ``mean``, ``std``, ``interpolation``.

    Args:
        model_name: an OpenCLIP architecture, e.g. ``ViT-B-16``, ``ViT-bigG-14`` (``open_clip.list_models()``).
        checkpoint: a local OpenCLIP checkpoint file (e.g. ``open_clip_pytorch_model.bin``).
        pretrained: an OpenCLIP pretrained tag (``open_clip.list_pretrained()``).
        features: ``"pre_projection"`` or ``"projected"``.
        preprocess: overrides of the preprocessing.
    """

    def __init__(
        self,
        model_name: str,
        checkpoint: str | None = None,
        pretrained: str | None = None,
        features: Features = "pre_projection",
        preprocess: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if features not in ("pre_projection", "projected"):
            raise ValueError(
                f"ClipEncoder.features must be 'pre_projection' or 'projected', got {features!r}"
            )
        open_clip = import_open_clip()
        if checkpoint is None and pretrained is None:
            raise ValueError(
                f"ClipEncoder({model_name!r}) has no weights: set checkpoint: <local OpenCLIP file> or pretrained: "
                "<OpenCLIP tag> (downloads once); a randomly initialised CLIP is not a pretrained encoder"
            )
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"ClipEncoder.checkpoint={str(path)!r} does not exist: point it at a local OpenCLIP weights file"
                )
            checkpoint = str(path)
        if checkpoint is None:
            self.clip = pretrained_or_explain(
                lambda: open_clip.create_model(model_name, pretrained=pretrained),
                f"OpenCLIP {model_name}/{pretrained}",
                instead="checkpoint: <a local OpenCLIP weights file> instead of pretrained",
            )
        else:
            self.clip = open_clip.create_model(model_name, pretrained=checkpoint)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"openclip:{model_name}" + (f"/{pretrained}" if pretrained else "")
        self.source, self.features, self.pretrained = checkpoint, features, pretrained
        self.projection = _split_projection(self.clip.visual) if features == "pre_projection" else None
        self.input_spec = _clip_input_spec(open_clip, self.clip, model_name, pretrained, preprocess or {})

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, S, S]`` prepared images -> ``[B, D]`` embeddings (pre-projection or projected)."""
        return self.clip.visual(x)

    def project(self, features: Tensor) -> Tensor:
        """``[B, D]`` features of :meth:`forward` -> ``[B, E]`` embeddings in the joint image-text space."""
        if self.projection is None:
            return features
        if isinstance(self.projection, nn.Parameter):
            return features @ self.projection.to(features.dtype)
        return self.projection.to(features.dtype)(features)

    @torch.no_grad()
    def encode_prompts(self, class_names: list[str], templates: tuple[str, ...] = PROMPT_TEMPLATES) -> Tensor:
        """``[C, E]`` class embeddings: per class the mean over ``templates`` of the L2-normalised text embeddings
        of ``template.format(c=name)``, L2-normalised again (Radford et al., 2021; Adaloglou et al., TMLR 2024)."""
        if not templates or any("{c}" not in t for t in templates):
            raise ValueError(f"prompt templates must each contain '{{c}}', got {list(templates)}")
        device = next(self.clip.parameters()).device
        per_template = [
            self.clip.encode_text(self.tokenizer([t.format(c=name) for name in class_names]).to(device), True)
            for t in templates
        ]
        return F.normalize(torch.stack(per_template).mean(dim=0).float(), dim=-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "features": self.features, "pretrained": self.pretrained}


def _split_projection(visual: nn.Module) -> nn.Parameter | nn.Module:
    """Detach the image tower's final projection (the tower then returns pre-projection features); return it."""
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):  # OpenCLIP VisionTransformer: pooled @ proj
        visual.proj = None
        return proj
    head = getattr(visual, "head", None)
    if isinstance(getattr(head, "proj", None), nn.Linear):  # OpenCLIP TimmModel with a linear projection
        linear = head.proj
        head.proj = nn.Identity()
        return linear
    raise ValueError(
        f"pre-projection features are not defined for the image tower {type(visual).__name__} (its projection is "
        "not a separate linear map): set features: projected"
    )


def _clip_input_spec(
    open_clip: Any, model: nn.Module, name: str, tag: str | None, overrides: dict[str, Any]
) -> InputSpec:
    unknown = set(overrides) - {"size", "mean", "std", "interpolation"}
    if unknown:
        raise ValueError(
            f"ClipEncoder.preprocess: unknown keys {sorted(unknown)}; use size, mean, std, interpolation"
        )
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    if tag:
        known = open_clip.get_pretrained_cfg(name, tag)
        cfg.update({k: known[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in known})
    cfg.update(overrides)
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ValueError(
            f"ClipEncoder: resize_mode {cfg['resize_mode']!r} is not supported (only 'shortest')"
        )
    size = cfg["size"]
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"ClipEncoder: non-square input size {size} is not supported")
        size = size[0]
    return InputSpec(
        size=int(size),
        mean=per_channel(cfg["mean"], 3),
        std=per_channel(cfg["std"], 3),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
