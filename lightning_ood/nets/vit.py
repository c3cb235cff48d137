"""Vision-transformer helpers over timm's ``VisionTransformer``: the [CLS] embedding and attention rollout.

Everything goes through timm's own modules (``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``,
``forward_features`` / ``forward_head``); there are no forward hooks and no re-implemented transformer. The one
thing timm does not return is a block's attention matrix (its fused ``scaled_dot_product_attention`` never
materialises it), so :func:`attention_probs` recomputes it from the block's own ``qkv`` projection, q/k norms and
scale, exactly as timm's unfused attention path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from lightning_ood.nets.timm_net import TimmNet


def check_cls_vit(model: nn.Module, key: str = "backbone") -> None:
    """Fail, naming ``key``, unless ``model`` is a timm ViT whose pooled feature is the post-norm [CLS] token.

    OODformer's embedding is the [CLS] token after the encoder's final LayerNorm (Koner et al., BMVC 2021,
    Sec. 3.1). On timm's ``VisionTransformer`` that is ``forward_head(forward_features(x), pre_logits=True)``
    exactly when ``global_pool == "token"``, there is no attention-pooling head and ``fc_norm`` is the identity
    while ``forward_features`` applies the final ``norm``. Distilled DeiTs (two heads) are not supported.
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{key}: OODformer needs a timm VisionTransformer (ViT / DeiT), got {type(model).__name__}"
        )
    problems = []
    if model.global_pool != "token":
        problems.append(f"global_pool={model.global_pool!r} (must be 'token')")
    if model.attn_pool is not None:
        problems.append("an attention-pooling head")
    if not isinstance(model.fc_norm, nn.Identity):
        problems.append(
            f"fc_norm={type(model.fc_norm).__name__} (a norm after pooling, not the final LayerNorm)"
        )
    if isinstance(model.norm, nn.Identity):
        problems.append("no final norm in forward_features (final_norm=False)")
    if model.cls_token is None or model.num_prefix_tokens < 1:
        problems.append("no [CLS] token (class_token=False)")
    if problems:
        raise ValueError(
            f"{key}: the pre-logit feature of this ViT is not the [CLS] token after the final LayerNorm: "
            f"{'; '.join(problems)}. Use a class-token ViT/DeiT and leave global_pool / fc_norm at their defaults."
        )


def attention_probs(attn: Attention, x: Tensor) -> Tensor:
    """The softmax attention matrix ``[B, H, N, N]`` of timm's ``Attention`` module for input tokens ``x``.

    ``x``: ``[B, N, D]``, the tokens *entering* the attention (after the block's ``norm1``). Rows sum to 1. This
    mirrors timm's unfused path (``softmax(q k^T * scale)`` with ``q_norm`` / ``k_norm``); dropout is not applied.
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


def _check_blocks(model: VisionTransformer) -> None:
    for i, blk in enumerate(model.blocks):
        # Pre-norm blocks only: attention sees norm1(x). Post-norm / parallel blocks would need another path.
        if type(blk) is not Block or not isinstance(blk.attn, Attention):
            raise ValueError(
                f"attention rollout supports timm's pre-norm vision_transformer.Block with layers.Attention; "
                f"block {i} is {type(blk).__name__} with {type(blk.attn).__name__}"
            )


def block_attentions(model: VisionTransformer, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Run the encoder and return every block's attention ``[B, H, N, N]`` and the final tokens ``[B, N, D]``.

    The token pipeline is timm's ``forward_features`` (patch embedding, position embedding, ``norm_pre``, the
    blocks, the final ``norm``); each block is run by timm and only its attention matrix is recomputed with
    :func:`attention_probs`. ``N = num_prefix_tokens + grid_h * grid_w``. Call in eval mode for exact results.
    """
    _check_blocks(model)
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    attentions = []
    for blk in model.blocks:
        attentions.append(attention_probs(blk.attn, blk.norm1(tokens)))
        tokens = blk(tokens)
    return attentions, model.norm(tokens)


def attention_rollout(attentions: list[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020, Sec. 3): ``R = A'_L ... A'_1`` with ``A' = norm(mean_h A + I)``.

    ``attentions``: per block ``[B, H, N, N]`` row-stochastic matrices (first block first). Heads are averaged,
    the identity is added for the residual connection and rows are renormalised to sum to 1, then the layers are
    multiplied. Returns ``[B, N, N]`` float32 with rows summing to 1; row 0 is how much each token flows into
    the [CLS] token.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one block's attention")
    rollout = None
    for att in attentions:
        a = att.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


class ViTNet(TimmNet):
    """A class-token timm ViT as (``features`` = post-norm [CLS] ``[B, D]``, ``logits`` ``[B, C]``) plus rollout.

    ``forward`` is :class:`TimmNet`'s: ``forward_head(forward_features(x), pre_logits=True)``, which
    :func:`check_cls_vit` guarantees is the [CLS] token after the final LayerNorm.
    """

    def __init__(self, model: nn.Module) -> None:
        check_cls_vit(model)
        super().__init__(model)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid ``(grid_h, grid_w)`` of the configured ``img_size``."""
        return tuple(self.model.patch_embed.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def attention_rollout(self, x: Tensor) -> Tensor:
        """``[B, N, N]`` attention rollout for images ``x`` ``[B, C, H, W]`` (see :func:`attention_rollout`)."""
        attentions, _ = block_attentions(self.model, x)
        return attention_rollout(attentions)

    def cls_attention(self, x: Tensor) -> Tensor:
        """``[B, grid_h, grid_w]``: the rollout's [CLS] row over the patch tokens (prefix tokens dropped).

        Values are the share of the [CLS] token's (rolled-out) attention that each patch receives; they sum to
        at most 1 per image (the rest stays on the prefix tokens).
        """
        rollout = self.attention_rollout(x)
        h, w = self.model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        return rollout[:, 0, self.num_prefix_tokens :].reshape(-1, h, w)


def upsample_map(attention: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly upsample ``[B, h, w]`` maps to ``[B, *size]`` and min-max scale each map to ``[0, 1]``."""
    up = F.interpolate(attention[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).amin(dim=1)[:, None, None]
    hi = up.flatten(1).amax(dim=1)[:, None, None]
    return (up - lo) / (hi - lo).clamp_min(1e-12)
