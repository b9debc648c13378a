"""Sparsifiner (Wei et al., CVPR 2023): a ViT whose every block attends, per image and per query, to the few
keys a cheap low-rank connectivity predictor picks (`../shared/design/sparsifiner.md`).

The model is timm's `VisionTransformer` (its parameter names, so the authors' state dicts load with
`strict=True`) with each block's attention replaced by `SparsifinerAttention`, which holds the predictor
`attn.mask_predictor.{proj_c_q, proj_c_k, proj_n, proj_back_n}`. Per block, with q, k [B, H, N, d]:

    coef   = softmax((proj_c_q(q) @ (proj_c_k(k)ᵀ @ proj_n)) · H^-1/2)     [B, H, N-P, K]  (P prefix rows dropped)
    approx = coef @ proj_back_nᵀ                                           [B, H, N-P, N]
             (sparse phase / eval: coef keeps its top `basis_coef_topk`, basis = |proj_back_nᵀ| > threshold)
    mask   = the `budget` largest entries of every approx row; prefix rows (class token, registers) all kept
    attn   = softmax(q kᵀ · d^-1/2, masked-out keys -inf)

Phases (`set_phase`): 'reconstruct' (in training mode: dense attention, signed basis, every coefficient; the
predictor learns to reconstruct the teacher's attention maps) and 'sparse' (masked attention; the predictor
is a constant of the loss). Evaluation is always sparse. With keep rate 1 the model is its ViT exactly.

Speed: the mask is computed without gradient, and attention runs in PyTorch's fused
`scaled_dot_product_attention` with an additive mask (no [B, H, N, N] probabilities in memory) — the
authors' code materialises the dense map and masks it afterwards. On a CPU the mask comes from a compiled
kernel (`students.sparsifiner.mask_kernel`: the same mask as torch.topk's, about 4x faster), which in evaluation also
forms each approximation row itself, so the [B, H, N-P, N] approximation is never materialised. With class-token pooling `forward` (the
head output) updates only the prefix tokens in the last block, since the head reads the class token alone;
mean and MAP pooling read every token, so there every row is computed.

Any supported teacher's tower: without a class token (SigLIP) there is no prefix row and every query row is
predicted; registers are prefix rows; the head pools as the teacher's (class token, mean, or its MAP head
`attn_pool`; the final LayerNorm as `norm` on every token or `fc_norm` after pooling); blocks keep the
teacher's MLP kind (SwiGLU, packed GLU) and exact width, activation and qk-norm (the predictor reads the
normed q and k, as the attention does).

Towers with rotary position embeddings (timm `Eva`: PE-Core, EVA-02, DINOv3; config `rope`): every block rotates
the queries and keys of the patch tokens by their positions on the patch grid, as the teacher does (prefix
tokens unrotated), before attention and before the predictor, which so reads the q and k the attention uses.
A tower without an absolute position embedding (DINOv3) has none here either (`pos_embed: false`); EVA-02
CLIP's extra LayerNorms and PE-Core's MAP head over the class token too are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from teachers.base import hidden_state_index
from teachers.rope import RotaryPositions, rotate_after_prefix

from .. import blocks
from . import mask_kernel
from .config import SparsifinerConfig

__all__ = ["PHASES", "Sparsifiner", "SparsifinerAttention", "SparsifinerOutput", "MaskPredictor"]

PHASES = ("reconstruct", "sparse")


# --------------------------------------------------------------------------
# The connectivity predictor
# --------------------------------------------------------------------------
class MaskPredictor(nn.Module):
    """Low-rank approximation of a block's attention map, from that block's own q and k."""

    def __init__(self, head_dim: int, num_tokens: int, reduced_dim: int, num_basis: int, share_inout_proj: bool):
        super().__init__()
        self.proj_c_q = nn.Linear(head_dim, reduced_dim)
        self.proj_c_k = nn.Linear(head_dim, reduced_dim)
        self.proj_n = nn.Parameter(torch.empty(num_tokens, num_basis))
        self.proj_back_n = self.proj_n if share_inout_proj else nn.Parameter(torch.empty(num_tokens, num_basis))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh predictors: truncated-normal 0.02 weights, zero biases (as the authors start them)."""
        for lin in (self.proj_c_q, self.proj_c_k):
            trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        trunc_normal_(self.proj_n, std=0.02)
        if self.proj_back_n is not self.proj_n:
            trunc_normal_(self.proj_back_n, std=0.02)

    def coefficients(self, q: Tensor, k: Tensor, num_prefix: int) -> Tensor:
        """softmax over K of the low-rank scores of every non-prefix query: [B, H, N-P, K].

        scores = proj_c_q(q) @ (proj_c_k(k)ᵀ @ proj_n) · H^-1/2, associated the cheap way: with
        A = kᵀ proj_n [d, K], k_down = W_k A + b_k (1ᵀ proj_n) [c, K] and scores = q (W_qᵀ k_down) +
        b_qᵀ k_down, the only products over the N tokens are kᵀ proj_n and q @ [d, K] (no c-wide copy
        of q and k; the same function).
        """
        heads = q.shape[1]
        wq, bq = self.proj_c_q.weight, self.proj_c_q.bias
        wk, bk = self.proj_c_k.weight, self.proj_c_k.bias
        a = k.transpose(-2, -1) @ self.proj_n  # [B, H, d, K]
        k_down = wk @ a + bk[:, None] * self.proj_n.sum(0)  # [B, H, c, K]
        m = wq.t() @ k_down  # [B, H, d, K]
        scores = q[:, :, num_prefix:] @ m + (bq @ k_down)[:, :, None]
        return (scores * heads ** -0.5).softmax(dim=-1)

    def sparse_terms(self, q: Tensor, k: Tensor, num_prefix: int, threshold: float, topk: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The sparse approximation's parts: each row's top-k coefficients (index, values: not renormalised)
        and the basis |proj_back_nᵀ| with entries <= threshold zeroed."""
        coef = self.coefficients(q, k, num_prefix)
        basis = self.proj_back_n.t().abs()
        basis = basis.masked_fill(basis <= threshold, 0.0)
        index = topk_index(coef.detach(), topk)
        return index, coef.gather(-1, index), basis

    def approx(self, q: Tensor, k: Tensor, num_prefix: int, threshold: float, topk: int,
               sparse: bool = True) -> Tensor:
        """The approximate attention [B, H, N-P, N]: sparse (top-k coefficients, |basis| > threshold) or
        dense (the reconstruct phase: every coefficient, signed basis)."""
        if not sparse:
            return self.coefficients(q, k, num_prefix) @ self.proj_back_n.t()
        return combine(*self.sparse_terms(q, k, num_prefix, threshold, topk))


def combine(index: Tensor, values: Tensor, basis: Tensor) -> Tensor:
    """Σ_t values[..., t] · basis[index[..., t]]: the sparse approximation [B, H, N-P, N] from its terms."""
    if csr_product(values, basis.shape[0]):
        return _csr_combination(index, values, basis)
    coef = values.new_zeros((*values.shape[:-1], basis.shape[0])).scatter_(-1, index, values)
    return coef @ basis


def csr_product(values: Tensor, num_basis: int) -> bool:
    """Whether the combination of these top-k coefficients runs as a CSR product: in evaluation on a CPU, in
    float32 (torch's CPU CSR product has no bfloat16 kernel: under bf16 autocast the dense product runs), with
    `sparse_product`'s many basis rows."""
    return (not torch.is_grad_enabled() and values.device.type == "cpu" and values.dtype == torch.float32
            and sparse_product(num_basis, values.shape[-1]))


def sparse_product(num_basis: int, topk: int) -> bool:
    """Whether evaluation on a CPU forms the approximation as a sparse (CSR) product of the top-k
    coefficients rather than a dense [N-P, K] @ [K, N] one: when K is at least 4 x topk (K = 228 for DINOv2
    at 518 px: it halves the product's time; the same sums, in another order)."""
    return num_basis >= 4 * topk


def _csr_combination(index: Tensor, values: Tensor, basis: Tensor) -> Tensor:
    """Σ_j values[..., j] · basis[index[..., j]] for every row, as one sparse (CSR) @ dense product."""
    import warnings

    *lead, k = index.shape
    rows = index.numel() // k
    crow = torch.arange(0, rows * k + 1, k, device=index.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        coef = torch.sparse_csr_tensor(crow, index.reshape(-1), values.reshape(-1), (rows, basis.shape[0]))
        out = coef @ basis
    return out.reshape(*lead, basis.shape[1])


def topk_index(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of every row of a non-negative x (unordered).

    Non-negative float32 values order as their int32 bit patterns, and torch's top-k runs about 1.7x
    faster on a CPU on int32 than on float32 (no NaN-aware comparisons): the same selection, cheaper.
    Both the sparse approximation and the coefficients are non-negative (softmax, |basis|).
    """
    if x.dtype == torch.float32:
        x = x.view(torch.int32)
    return x.topk(k, dim=-1, sorted=False).indices


def attention_mask(approx: Tensor, budget: int, num_prefix: int) -> Tensor:
    """[B, H, N, N] bool, True = kept: each (sparse, non-negative) approx row's `budget` largest keys;
    prefix rows keep every key."""
    b, h, rows, n = approx.shape
    if budget >= n:
        return approx.new_ones((b, h, n, n), dtype=torch.bool)
    mask = approx.new_zeros((b, h, n, n), dtype=torch.bool)
    mask[:, :, :num_prefix] = True
    mask[:, :, num_prefix:].scatter_(-1, topk_index(approx, budget), True)
    return mask


def attention_bias(approx: Tensor, budget: int, num_prefix: int, dtype: torch.dtype) -> Tensor:
    """The sparse mask as an additive bias (0 kept, -inf dropped), built directly: what the fused kernel takes.

    On a CPU in float32 the compiled selection (`students.sparsifiner.mask_kernel`) writes the same mask about 4x faster
    than the top-k, fill and scatter below."""
    if dtype == torch.float32:
        bias = mask_kernel.select_bias(approx, budget, num_prefix)
        if bias is not None:
            return bias
    b, h, rows, n = approx.shape
    bias = approx.new_full((b, h, n, n), float("-inf"), dtype=dtype)
    bias[:, :, :num_prefix] = 0.0
    bias[:, :, num_prefix:].scatter_(-1, topk_index(approx, budget), 0.0)
    return bias


# --------------------------------------------------------------------------
# Attention and block
# --------------------------------------------------------------------------
@dataclass
class BlockRecord:
    """What one block computed (filled by `forward_details`)."""

    approx_attn: Tensor | None = None  # [B, H, N-P, N]
    attn_mask: Tensor | None = None  # [B, H, N, N] bool, True = kept
    attn: Tensor | None = None  # [B, H, N, N] the probabilities used (only when asked for)


class SparsifinerAttention(nn.Module):
    """timm's fused-qkv attention (same parameter names) with a connectivity predictor."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, num_tokens: int, num_prefix: int, budget: int,
                 reduced_dim: int, num_basis: int, share_inout_proj: bool, basis_threshold: float,
                 basis_coef_topk: int, qk_norm: bool = False, eps: float = 1e-6, attn_norm: bool = False,
                 rotate_half: bool | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_tokens = num_tokens
        self.num_prefix = num_prefix
        self.budget = budget
        self.basis_threshold = basis_threshold
        self.basis_coef_topk = basis_coef_topk
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # timm's qk-norm (same names): the attention and the predictor both read the normed q and k.
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        # EVA-02 CLIP's LayerNorm on the attention output before the projection (timm's `scale_norm`).
        self.norm = nn.LayerNorm(dim, eps=eps) if attn_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # A rotary tower's block (`rope=` in forward): the layout its rotations are applied in; None without.
        self.rotate_half = rotate_half
        self.mask_predictor = MaskPredictor(self.head_dim, num_tokens, reduced_dim, num_basis, share_inout_proj)

    @property
    def is_sparse(self) -> bool:
        return self.budget < self.num_tokens

    @property
    def rotary(self) -> bool:
        return self.rotate_half is not None

    def _qkv(self, x: Tensor, queries: int | None = None, rope: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, N or queries, d], k, v [B, H, N, d]: with `queries`, q only for the first rows (the
        class token of the last block), from the same weights. With `rope`, the queries and keys of the tokens
        after the prefix rotated by it (after qk-norm, as timm's `AttentionRope`); prefix queries are not."""
        b, n, c = x.shape
        shape = (self.num_heads, self.head_dim)
        if queries is None:
            qkv = self.qkv(x).reshape(b, n, 3, *shape).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :queries], w[:c], None if bias is None else bias[:c])
            q = q.reshape(b, queries, *shape).transpose(1, 2)
            kv = F.linear(x, w[c:], None if bias is None else bias[c:])
            k, v = kv.reshape(b, n, 2, *shape).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            k = rotate_after_prefix(k, rope, self.num_prefix, self.rotate_half)
            if queries is None:  # else q holds prefix rows only (`queries` <= num_prefix): unrotated
                q = rotate_after_prefix(q, rope, self.num_prefix, self.rotate_half)
        return q, k, v

    def predict(self, q: Tensor, k: Tensor, sparse: bool = True) -> Tensor:
        return self.mask_predictor.approx(q, k, self.num_prefix, self.basis_threshold, self.basis_coef_topk, sparse)

    def sparse_bias(self, q: Tensor, k: Tensor) -> Tensor:
        """The additive mask that `attention_bias(self.predict(q, k))` gives. Where the approximation would
        be a CSR product on a CPU, the compiled kernel (`students.sparsifiner.mask_kernel`) sums, selects and writes
        each row in one pass instead, with the same bits, and the [B, H, N-P, N] approximation is never
        formed."""
        terms = self.mask_predictor.sparse_terms(q, k, self.num_prefix, self.basis_threshold, self.basis_coef_topk)
        if q.dtype == torch.float32 and csr_product(terms[1], terms[2].shape[0]):
            bias = mask_kernel.combine_select_bias(*terms, self.budget, self.num_prefix)
            if bias is not None:
                return bias
        return attention_bias(combine(*terms), self.budget, self.num_prefix, q.dtype)

    def forward(self, x: Tensor, dense: bool = False, record: BlockRecord | None = None,
                keep_attn: bool = False, queries: int | None = None, rope: Tensor | None = None) -> Tensor:
        """x [B, N, C] -> [B, N, C] (or [B, queries, C]: only the first `queries` rows are updated).

        dense: the reconstruct phase's dense attention (the predictor still runs when recording, so that
        its approximation can be trained against the teacher's map). The mask is a constant: no gradient
        reaches the predictor through it. rope: a rotary tower's rotations of the patch tokens
        (`Sparsifiner.block_rotations`), which the attention and the predictor both see.
        """
        if self.rotary != (rope is not None):
            raise ValueError("this block rotates its patch tokens' queries and keys by their grid positions: pass "
                             "rope=, Sparsifiner.block_rotations()'s" if self.rotary else
                             "rope= given to a block without rotary position embeddings")
        b, n, c = x.shape
        # Only prefix rows to update (the last block of a class-token head): they attend densely, so no
        # predictor runs and q is needed for those rows alone.
        q_rows = queries if record is None and queries is not None and queries <= self.num_prefix else None
        q, k, v = self._qkv(x, q_rows, rope)
        masked = not dense and self.is_sparse
        mask = bias = None
        if record is not None:
            # The approximation has a gradient in the reconstruct phase only (its loss trains the predictor).
            with torch.set_grad_enabled(torch.is_grad_enabled() and dense):
                approx = self.predict(q, k, sparse=not dense)
            record.approx_attn = approx
            if not dense:  # the reconstruct phase attends densely: no mask to form
                with torch.no_grad():
                    record.attn_mask = attention_mask(approx, self.budget, self.num_prefix)
            if masked:
                mask = record.attn_mask
                if not keep_attn:
                    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        elif masked and (queries is None or queries > self.num_prefix):
            with torch.no_grad():
                bias = self.sparse_bias(q, k)
        if queries is not None:
            q = q[:, :, :queries]
            mask = None if mask is None else mask[:, :, :queries]
            bias = None if bias is None else bias[:, :, :queries]
        if keep_attn:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            attn = logits.softmax(dim=-1)
            record.attn = attn
            out = attn @ v
        else:
            # An additive mask: PyTorch's fused CPU kernel takes it faster than a boolean one.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, c)
        return self.proj(self.norm(out))


class SparsifinerBlock(Block):
    """timm's pre-norm `Block` (same names) around a `SparsifinerAttention`."""

    def __init__(self, attn: SparsifinerAttention, **block_kwargs):
        super().__init__(**block_kwargs)
        self.attn = attn

    def forward(self, x: Tensor, dense: bool = False, record: BlockRecord | None = None,
                keep_attn: bool = False, queries: int | None = None, rope: Tensor | None = None) -> Tensor:
        y = self.attn(self.norm1(x), dense=dense, record=record, keep_attn=keep_attn, queries=queries, rope=rope)
        x = (x if queries is None else x[:, :queries]) + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------
@dataclass
class SparsifinerOutput:
    output: Tensor  # [B, output_dim]: what forward() returns
    pre_logits: Tensor  # [B, embed_dim]: the pooled, normed feature before the head (class token, mean or MAP)
    tokens: Tensor  # [B, N, embed_dim]: every final-normed token, prefix tokens (class token, registers) first
    approx_attn: list[Tensor] = field(default_factory=list)  # per block [B, H, N-P, N]
    attn_masks: list[Tensor] = field(default_factory=list)  # per block [B, H, N, N] bool, True = kept
    # (None in the reconstruct phase's training, which attends densely)
    attn: list[Tensor] = field(default_factory=list)  # per block [B, H, N, N] (empty unless asked for)

    num_prefix_tokens: int = 1

    @property
    def patch_tokens(self) -> Tensor:
        """The final-normed patch tokens [B, N - P, C] (prefix tokens dropped)."""
        return self.tokens[:, self.num_prefix_tokens:]


class Sparsifiner(VisionTransformer):
    """Sparsifiner for images [B, 3, H, W] at the config's `img_size` (normalised with the model's mean/std).

    The tower and its head are timm's `VisionTransformer` built from the config (class token or none,
    registers, `global_pool` 'token' / 'avg' / 'map' with its `attn_pool`, `norm` or `fc_norm`, the MLP kind,
    qk-norm): a teacher's timm weights load under their own names.
    """

    def __init__(self, config: SparsifinerConfig | Mapping[str, Any]):
        cfg = SparsifinerConfig.from_dict(config)
        norm_layer = partial(nn.LayerNorm, eps=cfg.ln_eps)
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
            global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, class_token=cfg.class_token,
            no_embed_class=cfg.no_embed_class, reg_tokens=cfg.reg_tokens, pre_norm=cfg.pre_norm,
            fc_norm=cfg.fc_norm, norm_layer=norm_layer, act_layer=cfg.act, drop_path_rate=cfg.drop_path_rate,
            pos_embed="learn" if cfg.pos_embed else "none", pool_include_prefix=cfg.pool_include_prefix,
            block_fn=partial(self._block, cfg),
        )
        self.config = cfg
        # A rotary tower's positions (the teacher's, rebuilt from `cfg.rope`) and its timm module, registered as
        # `rope` (RoPE-Mixed's frequencies are weights).
        self.rotary = None if cfg.rope is None else RotaryPositions.from_spec(
            cfg.rope, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_prefix_tokens=cfg.num_prefix_tokens,
            depth=cfg.depth)
        self.rope = None if self.rotary is None else self.rotary.module
        if cfg.pool_spec is not None:  # the teacher's own MAP head (timm builds one from the block's ratio)
            self.attn_pool = blocks.map_pool(cfg.embed_dim, cfg.pool_spec)
        if cfg.num_classes and not cfg.head_bias:
            self.head = nn.Linear(cfg.embed_dim, cfg.num_classes, bias=False)
            trunc_normal_(self.head.weight, std=0.02)
        self.phase = "sparse"

    @staticmethod
    def _block(cfg: SparsifinerConfig, dim, num_heads, mlp_ratio, qkv_bias, qk_norm, proj_bias, init_values,
               proj_drop, attn_drop, drop_path, norm_layer, act_layer, mlp_layer, depth, **_):
        i = depth  # timm passes the block's index as `depth`
        attn = SparsifinerAttention(
            dim, num_heads, qkv_bias, cfg.num_tokens, cfg.num_prefix_tokens, cfg.budgets[i], cfg.reduced_dim,
            cfg.num_basis, cfg.share_inout_proj, cfg.basis_threshold, cfg.basis_coef_topk, cfg.qk_norm, cfg.ln_eps,
            attn_norm=cfg.attn_norm, rotate_half=None if cfg.rope is None else cfg.rope["rotate_half"])

        def mlp_layer(in_features, hidden_features, act_layer, **_):
            # The exact hidden width (no ratio gives SO400M's 4304 of 1152) and the MLP kind, timm's modules.
            return blocks.mlp(cfg.mlp_layer, in_features, cfg.hidden_dim, cfg.act,
                              norm_eps=cfg.ln_eps if cfg.mlp_norm else None)

        return SparsifinerBlock(attn, dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                init_values=init_values, drop_path=drop_path, norm_layer=norm_layer,
                                act_layer=act_layer, mlp_layer=mlp_layer)

    def init_weights(self, mode: str = "", **kwargs) -> None:
        super().init_weights(mode, **kwargs)
        for m in self.modules():
            if isinstance(m, MaskPredictor):
                m.reset_parameters()

    # ------------------------------------------------------------- phases
    def set_phase(self, phase: str) -> "Sparsifiner":
        """'reconstruct' (training mode: dense attention, the predictor fits the teacher's maps) or 'sparse'."""
        if phase not in PHASES:
            raise ValueError(f"unknown Sparsifiner phase {phase!r}; the phases are {' and '.join(PHASES)}")
        self.phase = phase
        return self

    @property
    def _dense(self) -> bool:
        return self.training and self.phase == "reconstruct"

    @property
    def budgets(self) -> list[int]:
        return [blk.attn.budget for blk in self.blocks]

    @property
    def sparse_blocks(self) -> list[int]:
        """The blocks whose attention is masked (keep rate below 1); the others attend densely."""
        return [i for i, blk in enumerate(self.blocks) if blk.attn.is_sparse]

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def pools_class_token(self) -> bool:
        """Whether the head reads the class token alone (then the last block need update only the prefix rows)."""
        return self.global_pool == "token"

    # ------------------------------------------------------------ forward
    def _check_images(self, images: Tensor) -> None:
        h, w = self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or tuple(images.shape[-2:]) != (h, w):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"this Sparsifiner takes images [B, 3, {h}, {w}] (its predictor's N x K matrices fix the "
                f"resolution to {h}x{w}, N = {self.num_tokens} tokens), got {shape}; resize the images to {h}x{w}")

    def _embed(self, images: Tensor) -> Tensor:
        self._check_images(images)
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))

    def _run_blocks(self, x: Tensor, records: list[BlockRecord] | None = None, keep_attn: bool = False,
                    stop: int | None = None, class_token_only: bool = False,
                    hidden_states: list[Tensor] | None = None) -> Tensor:
        """`hidden_states`: a list that receives each block's raw output."""
        dense = self._dense
        blocks = list(self.blocks)[:stop]
        rotations = self.block_rotations(x.device) if self.rotary is not None else None
        for i, blk in enumerate(blocks):
            record = records[i] if records is not None else None
            last = class_token_only and i == len(blocks) - 1
            queries = self.num_prefix_tokens if last else None
            rope = None if rotations is None else rotations[i]
            x = blk(x, dense=dense, record=record, keep_attn=keep_attn, queries=queries, rope=rope)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def block_rotations(self, device: torch.device | None = None) -> list[Tensor]:
        """Each block's rotations of the patch tokens at their positions on the grid (a rotary tower's; the
        teacher's own, `teachers.rope.RotaryPositions.rotations`)."""
        if self.rotary is None:
            raise ValueError("this Sparsifiner has no rotary position embeddings (config.rope is None)")
        grid = self.rotary.grid_positions(device)
        if self.rotary.per_block:
            return [self.rotary.rotations(grid, i) for i in range(len(self.blocks))]
        return [self.rotary.rotations(grid)] * len(self.blocks)

    def final_norm(self, x: Tensor) -> Tensor:
        """The final LayerNorm applied to every token (`norm`, or `fc_norm` where the tower norms after
        pooling): what a teacher's `final_tokens` are."""
        return self.fc_norm(x) if self.config.fc_norm else self.norm(x)

    def forward_features(self, images: Tensor, class_token_only: bool = False) -> Tensor:
        """Tokens [B, N, C] after `norm` (timm's forward_features: the identity where `fc_norm` follows the
        pooling); with class_token_only, the prefix tokens only (the same values), for class-token pooling."""
        if class_token_only and not self.pools_class_token:
            raise ValueError(f"class_token_only=True: this Sparsifiner pools with {self.global_pool!r}, which "
                             f"reads every patch token, not the class token alone; call forward_features(images)")
        return self.norm(self._run_blocks(self._embed(images), class_token_only=class_token_only))

    def forward(self, images: Tensor, pre_logits: bool = False) -> Tensor:
        """The head output [B, num_classes] (pre_logits: the pooled, normed feature [B, embed_dim])."""
        return self.forward_head(self.forward_features(images, class_token_only=self.pools_class_token),
                                 pre_logits=pre_logits)

    def forward_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_logits, output)`` of one pass: the pooled, normed feature and the head's output."""
        pre = self.forward_head(self.forward_features(images, class_token_only=self.pools_class_token),
                                pre_logits=True)
        return pre, self.head(pre)

    def forward_details(self, images: Tensor, attention: bool = True, maps: bool = True) -> SparsifinerOutput:
        """Output, every final-normed token, and per block the approximation and the mask (`maps`) and the
        attention probabilities used (`attention`, which needs `maps`).

        Training: the reconstruct phase needs `maps` (the approximations carry the gradient), not
        `attention`; the sparse phase needs neither (`maps=False`: the fused kernel runs and no [B, H, N, N]
        tensor is kept per block).
        """
        records = [BlockRecord() for _ in self.blocks] if maps else None
        x = self._run_blocks(self._embed(images), records, keep_attn=attention and maps)
        features = self.norm(x)
        pre = self.forward_head(features, pre_logits=True)
        records = records or []
        return SparsifinerOutput(
            output=self.head(pre), pre_logits=pre, tokens=self.fc_norm(x) if self.config.fc_norm else features,
            num_prefix_tokens=self.num_prefix_tokens, approx_attn=[r.approx_attn for r in records],
            attn_masks=[r.attn_mask for r in records], attn=[r.attn for r in records] if attention else [])

    def forward_tokens(self, images: Tensor, layer: int = -1, class_token: bool = True) -> Tensor:
        """Tokens [B, N, C] after a block, indexed as LLaVA's mm_vision_select_layer and transformers'
        `hidden_states[layer]`: 0 the embedded tokens entering block 0, k after k blocks, negative from
        the end (-2: after the penultimate block). layer -1 alone gives the final-normed tokens; every
        other layer (`depth` included) a block's raw output. class_token=False drops the prefix tokens
        (class token and registers; none without them), leaving the patches. The same indexing as
        `SparseFormer.forward_tokens` and the teachers'."""
        index = hidden_state_index(layer, len(self.blocks), "this Sparsifiner")
        x = self._run_blocks(self._embed(images), stop=index)
        if layer == -1:
            x = self.final_norm(x)
        return x if class_token else x[:, self.num_prefix_tokens:]

    def forward_hidden_states(self, images: Tensor) -> list[Tensor]:
        """Every hidden state `forward_tokens` can select, from one pass: `depth + 1` raw tensors
        [B, N, C] (the embedded tokens, then each block's output), prefix tokens first."""
        states = [self._embed(images)]
        self._run_blocks(states[0], hidden_states=states)
        return states

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "", self.global_pool):
            raise ValueError(f"this Sparsifiner pools with global_pool {self.global_pool!r} (its config's); "
                             f"reset_classifier cannot change it to {global_pool!r}")
        bias = self.config.head_bias
        self.head = nn.Linear(self.embed_dim, num_classes, bias=bias) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
