"""A budget ViT: a teacher's whole tower run on fewer tokens, at a lower resolution or with a larger patch.

The model is timm's `VisionTransformer` built from the config (the teacher's blocks, prefix tokens, pooling and head,
under timm's names) over ``img_size`` images of ``patch_size`` patches. It takes the images its teacher takes
(``input_size``, normalised the teacher's way) and reduces them itself: resized to ``img_size`` (the teacher's
interpolation, antialiased) where that is smaller, so the run, the evaluation and the exports feed it as they feed
every student. Where the patch is larger instead, ``img_size`` is the input size and nothing is resized.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from teachers.base import hidden_state_index

from .. import blocks
from .config import BudgetConfig

__all__ = ["BudgetOutput", "BudgetViT"]


@dataclass
class BudgetOutput:
    output: Tensor  # [B, output_dim]: what forward() returns
    pre_logits: Tensor  # [B, embed_dim]: the pooled, normed feature before the head
    tokens: Tensor  # [B, N, embed_dim]: every final-normed token, prefix tokens first
    images: Tensor  # [B, 3, h, w]: the images the patch embedding saw (resized to img_size)
    num_prefix_tokens: int = 1

    @property
    def patch_tokens(self) -> Tensor:
        return self.tokens[:, self.num_prefix_tokens:]


class BudgetViT(VisionTransformer):
    """A ViT taking images [B, 3, *input_size] and running at ``img_size`` with ``patch_size`` patches (see the module
    docstring); timm's forward, forward_features and forward_head, with the resize first."""

    def __init__(self, config: BudgetConfig | Mapping[str, Any]):
        cfg = BudgetConfig.from_dict(config)

        def mlp_layer(in_features, act_layer=None, **_):
            # The exact hidden width (no ratio gives SO400M's 4304 of 1152) and the MLP kind, timm's modules.
            return blocks.mlp(cfg.mlp_layer, in_features, cfg.hidden_dim, cfg.act)

        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
            global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio, qkv_bias=True, qk_norm=cfg.qk_norm, class_token=cfg.class_token,
            no_embed_class=cfg.no_embed_class, reg_tokens=cfg.reg_tokens, pre_norm=cfg.pre_norm, fc_norm=cfg.fc_norm,
            norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps), act_layer=blocks.act_layer(cfg.act),
            drop_path_rate=cfg.drop_path_rate, mlp_layer=mlp_layer)
        self.config = cfg
        if cfg.pool_spec is not None:  # the teacher's own MAP head (timm builds one from the block's ratio)
            self.attn_pool = blocks.map_pool(cfg.embed_dim, cfg.pool_spec)
        if cfg.num_classes and not cfg.head_bias:
            self.head = nn.Linear(cfg.embed_dim, cfg.num_classes, bias=False)
            trunc_normal_(self.head.weight, std=0.02)

    # ------------------------------------------------------------------ the input
    def reduce(self, images: Tensor) -> Tensor:
        """Images [B, 3, *input_size] as the patch embedding sees them: resized to ``img_size`` where it is smaller."""
        h, w = self.config.input_hw
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or tuple(images.shape[-2:]) != (h, w):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"this budget ViT takes its teacher's images [B, 3, {h}, {w}] and reduces them itself "
                             f"(to {self.config.image_hw[0]}x{self.config.image_hw[1]} px, {self.config.patch_size}-px "
                             f"patches), got {shape}")
        if self.config.image_hw == (h, w):
            return images
        # Resizing the normalised image is resizing the image, then normalising: both are linear per channel.
        return F.interpolate(images, size=self.config.image_hw, mode=self.config.interpolation, antialias=True,
                             align_corners=False)

    @property
    def num_tokens(self) -> int:
        """Every token entering the blocks: the prefix tokens and the patches."""
        return self.num_prefix_tokens + self.config.num_patches

    # ------------------------------------------------------------------ forward
    def _embed(self, images: Tensor, reduced: bool = False) -> Tensor:
        """The tokens entering block 0 (timm's steps of forward_features before the blocks); ``reduced``: the images
        are already at ``img_size``."""
        small = images if reduced else self.reduce(images)
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(small))))

    def forward_features(self, images: Tensor, **kwargs) -> Tensor:
        """timm's forward_features on the reduced images: tokens [B, N, C] after `norm`."""
        return super().forward_features(self.reduce(images), **kwargs)

    def forward(self, images: Tensor, pre_logits: bool = False) -> Tensor:
        """The head output [B, num_classes] (pre_logits: the pooled, normed feature [B, embed_dim])."""
        return self.forward_head(self.forward_features(images), pre_logits=pre_logits)

    def forward_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_logits, output)`` of one pass: the pooled, normed feature and the head's output."""
        pre = self.forward_head(self.forward_features(images), pre_logits=True)
        return pre, self.head(pre)

    def final_norm(self, x: Tensor) -> Tensor:
        """The final LayerNorm on every token (`norm`, or `fc_norm` where the tower norms after pooling)."""
        return self.fc_norm(x) if self.config.fc_norm else self.norm(x)

    def forward_details(self, images: Tensor) -> BudgetOutput:
        """Output, pre-logits, every final-normed token and the reduced images, from one pass."""
        small = self.reduce(images)
        x = self.blocks(self._embed(small, reduced=True))
        features = self.norm(x)
        pre = self.forward_head(features, pre_logits=True)
        return BudgetOutput(output=self.head(pre), pre_logits=pre, tokens=self.final_norm(x), images=small,
                            num_prefix_tokens=self.num_prefix_tokens)

    def forward_tokens(self, images: Tensor, layer: int = -1, class_token: bool = True) -> Tensor:
        """Tokens [B, N, C] after a block, indexed as LLaVA's mm_vision_select_layer and transformers'
        `hidden_states[layer]`: 0 the embedded tokens entering block 0, k after k blocks, negative from the end.
        layer -1 alone gives the final-normed tokens; every other layer a block's raw output. class_token=False
        drops the prefix tokens (class token and registers). The indexing of the teachers and the other families."""
        index = hidden_state_index(layer, len(self.blocks), "this budget ViT")
        x = self._embed(images)
        for blk in list(self.blocks)[:index]:
            x = blk(x)
        if layer == -1:
            x = self.final_norm(x)
        return x if class_token else x[:, self.num_prefix_tokens:]

    def forward_hidden_states(self, images: Tensor) -> list[Tensor]:
        """Every hidden state `forward_tokens` can select, from one pass: the embedded tokens, then each block's raw
        output, [B, N, C] each, prefix tokens first."""
        states = [self._embed(images)]
        for blk in self.blocks:
            states.append(blk(states[-1]))
        return states

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "", self.global_pool):
            raise ValueError(f"this budget ViT pools with global_pool {self.global_pool!r} (its config's); "
                             f"reset_classifier cannot change it to {global_pool!r}")
        bias = self.config.head_bias
        self.head = nn.Linear(self.embed_dim, num_classes, bias=bias) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
