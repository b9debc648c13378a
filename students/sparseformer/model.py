"""SparseFormer and MediaSparseFormer, as in `../shared/design/sparseformer.md`.

The model sees an image through a few latent tokens. Each token has an
embedding and a region of interest (RoI, corner form `x1, y1, x2, y2` in
normalised image coordinates). Units of ops refine both:

    ATTN        x = x + attn(norm1(x))                  (timm ViT attention)
    MLP         x = x + mlp(norm2(x))                   (timm ViT MLP)
    ROI_ADJ     RoI centre/size moved by a prediction from x
    SAMPLING_M  sample the early-convolution map at points inside the RoI,
                decode them by adaptive mixing, x = x + out_proj(...)
    PE_INJECT   x = x + pe_transition(sin/cos encoding of the RoI)

Parameter names and shapes match the released checkpoints exactly.
The video model shares every op; only the number of RoI coordinates
(`ndim` = 2 for images, 3 for video: x, y, t) and the early convolution differ.

Students of rotary teachers (PE-Core, EVA-02, DINOv3; config `rope`): the blocks after the
last RoI op keep the teacher's rotary attention (timm `AttentionRope`). A latent token has no
patch, so its position is its RoI's centre on the teacher's patch grid, in patches (a token
whose RoI is exactly one patch gets that patch's rotation, and one between patches angles in
between: every rotary kind is linear in the position). The RoIs stop moving before these
blocks, so the final RoIs give every block's positions (`block_rotations`); the class token
stays unrotated, as the teacher's prefix tokens. The grid is the teacher's at its own
resolution whatever the input size, since RoIs are in normalised image coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from teachers.base import hidden_state_index
from teachers.rope import RotaryPositions, rotate_after_prefix

from .. import blocks
from .config import HEAD_OP_TO_POOL, ROI_OPS, SparseFormerConfig

# The 7x7 kernel of the early convolution must fit in the image.
MIN_INPUT_SIZE = 7


# --------------------------------------------------------------------------
# Early convolution
# --------------------------------------------------------------------------
class EarlyConvolution(nn.Module):
    """conv 7x7/2 -> ReLU -> max-pool 3x3/2 -> per-pixel normalisation over channels.

    ``unbiased``: the normalisation of the authors' training code, (x - mean) / sqrt(unbiased var + 1e-7)
    (`CompatibleConfig.imagenet_code_norms`).
    """

    def __init__(self, conv_dim: int, ndim: int = 2, unbiased: bool = False):
        super().__init__()
        self.unbiased = unbiased
        if ndim == 2:
            self.conv1 = nn.Conv2d(3, conv_dim, kernel_size=7, stride=2, padding=3)
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:  # video: the same 2-D kernel on every frame
            self.conv1 = nn.Conv3d(3, conv_dim, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3))
            self.pool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # In place: the conv output is a fresh temporary, and a new 25 MB ReLU output (at 224, batch 8)
        # costs more in page faults than the ReLU itself.
        x = self.pool(F.relu(self.conv1(_channels_last(x)), inplace=True))
        c = x.shape[1]
        if self.unbiased:
            # (x - mean) / sqrt(var * c / (c - 1) + 1e-7) as one fused LayerNorm: its eps and a rescale.
            x = F.layer_norm(x.movedim(1, -1), (c,), eps=1e-7 * (c - 1) / c) * math.sqrt((c - 1) / c)
            return x.movedim(-1, 1)
        # LayerNorm over channels without affine: (x - mean) / sqrt(var + 1e-5).
        x = F.layer_norm(x.movedim(1, -1), (c,), eps=1e-5)
        return x.movedim(-1, 1)


def _channels_last(x: Tensor) -> Tensor:
    """`x` stored channels-last (same values, NCHW shape).

    Speed only: on CPU, oneDNN's channels-last 7x7 convolution and the
    channels-last max-pool are several times faster than their NCHW versions
    (the NCHW max-pool alone cost more than the convolution), the per-pixel
    channel LayerNorm then reads contiguous rows instead of copying a
    transposed map, and `grid_sample` gathers faster from a channels-last map.
    """
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


# --------------------------------------------------------------------------
# RoI geometry
# --------------------------------------------------------------------------
def roi_centre_size(roi: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    """Centre and *signed* size of corner-form RoIs."""
    p1, p2 = roi[..., :ndim], roi[..., ndim:]
    return (p1 + p2) / 2, p2 - p1


def roi_position_encoding(roi: Tensor, dim: int) -> Tensor:
    """sin/cos encoding of the 4 RoI numbers; no gradient flows into the RoI."""
    r = roi.detach().float() * math.pi
    freqs = torch.exp(torch.linspace(0, math.log(128), dim // 4, device=roi.device))
    x = r[..., None] * freqs  # [.., 4, dim/4]
    x = torch.cat([x[..., 0::2].sin(), x[..., 1::2].cos()], dim=-1)
    return x.flatten(-2)


def class_token_attention(attn: Attention, x: Tensor, rope: Tensor | None = None) -> Tensor:
    """`attn(x)[:, :1]` (`attn(x, rope=rope)[:, :1]`) computed for the class token alone: its query against
    every token's key and value. (timm's `Attention` or `AttentionRope` as SFUnit builds it: optional qk-norm,
    no gate; the class token is a prefix token, so its query is not rotated, the keys after the prefix are.)"""
    B, L, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :1], w[: h * d], None if b is None else b[: h * d])
    kv = F.linear(x, w[h * d :], None if b is None else b[h * d :])
    q = attn.q_norm(q.reshape(B, 1, h, d).transpose(1, 2))
    k, v = kv.reshape(B, L, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    k = attn.k_norm(k)
    if rope is not None:
        k = rotate_after_prefix(k, rope, attn.num_prefix_tokens, attn.rotate_half)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, 1, h * d))))


class _ClampGrad(torch.autograd.Function):
    """Identity whose gradient is clamped to [-bound, bound] (`restrict_grad_norm`)."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.bound = bound
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(-ctx.bound, ctx.bound), None


# --------------------------------------------------------------------------
# Adaptive mixing (the decoder of SAMPLING_M)
# --------------------------------------------------------------------------
class AdaptiveMixing(nn.Module):
    """Per-token channel mixing `Mc` then point mixing `Ms`, both generated from the token."""

    def __init__(self, dim: int, conv_dim: int, num_points: int, inner_dim: int, mixing_bias: bool,
                 eps: float = 1e-5):
        super().__init__()
        self.conv_dim, self.num_points = conv_dim, num_points
        self.out_points = max(num_points, 32)
        self.mixing_bias = mixing_bias
        if mixing_bias:
            self.m_beta = nn.Parameter(torch.zeros(conv_dim))
            self.s_beta = nn.Parameter(torch.zeros(self.out_points))
        self.parameter_generator = nn.Sequential(
            nn.LayerNorm(dim, eps=eps),  # 1e-5 whatever ln_eps says, except in the authors' training code
            nn.Linear(dim, inner_dim),
            nn.Linear(inner_dim, conv_dim * conv_dim + self.out_points * num_points),
        )
        self.out_proj = nn.Linear(self.out_points * conv_dim, dim)

    def forward(self, x: Tensor, sampled: Tensor) -> Tensor:
        """x: [B, N, dim] (or [1, 1 or N, dim], shared by every image); sampled: [B, N, P, C] -> [B, N, dim]."""
        P, C = sampled.shape[-2:]
        params = self.parameter_generator(x)
        channel_mix = params[..., : C * C].unflatten(-1, (C, C))  # [.., C_in, C_out]
        point_mix = params[..., C * C :].unflatten(-1, (self.out_points, P))  # [.., P_out, P]
        # matmul broadcasts mixing matrices generated once for all images (see SFUnit.forward).
        h = torch.matmul(sampled.to(channel_mix.dtype), channel_mix)
        if self.mixing_bias:
            h = F.gelu(h + self.m_beta)
            h = torch.matmul(point_mix, h) + self.s_beta[:, None]
        else:
            h = torch.matmul(point_mix, h)  # no GELU between the two mixings
        h = F.gelu(h)
        return self.out_proj(h.flatten(-2))


# --------------------------------------------------------------------------
# A unit: `repeats` passes of its ops with shared weights
# --------------------------------------------------------------------------
class SFUnit(nn.Module):
    def __init__(
        self,
        dim: int,
        ops: list[str],
        repeats: int,
        cfg: SparseFormerConfig,
        drop_path_rates: list[float],
        ndim: int = 2,
        rotary: bool = False,
    ):
        super().__init__()
        cc = cfg.compatible_config
        self.dim, self.ops, self.repeats, self.ndim = dim, list(ops), repeats, ndim
        # A block inherited from a rotary teacher: its attention takes the rotations of its tokens' positions.
        self.rotary = rotary
        self.num_points = cfg.num_sampling_points
        self.grid_sample_kwargs = dict(
            mode=cc.grid_sample_config.mode,
            padding_mode=cc.grid_sample_config.padding_mode,
            align_corners=cc.grid_sample_config.align_corners,
        )
        self.restrict_grad_norm = cc.restrict_grad_norm
        self.offset_std_eps = 1e-7 if cc.imagenet_code_norms else 1e-5
        self.type_op_adjust = cc.type_op_adjust
        # Video: the RoI encoding of a tube (`VideoConfig.roi_encoding`; the authors' model encodes none).
        self.video_roi_encoding = cfg.video.roi_encoding if cfg.video is not None else "none"
        eps = cc.ln_eps

        # Registration order gives the released checkpoints' key order.
        if "SAMPLING_M" in ops:
            self.roi_offset_bias = nn.Parameter(torch.zeros(ndim * self.num_points))
        if cc.use_stage_embedding and repeats > 1:
            self.stage_embedding = nn.Embedding(repeats, dim)
        if "SAMPLING_M" in ops:
            pg = cc.pg_inner_dim
            inner = pg if isinstance(pg, int) else int(pg * dim)
            self.adaptive_mixing = AdaptiveMixing(dim, cfg.conv_dim, self.num_points, inner, cc.mixing_bias,
                                                  eps if cc.imagenet_code_norms else 1e-5)
            self.roi_offset_module = nn.Sequential(
                nn.LayerNorm(dim, eps=eps), nn.Linear(dim, ndim * self.num_points, bias=False)
            )
        # Units run once (the inherited blocks) take the teacher's block kind; the focusing unit is plain.
        inherited_kind = repeats == 1
        if "ATTN" in ops:
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            rope = dict(rope_prefix=int(cfg.has_cls_token), rotate_half=cfg.rope["rotate_half"]) if rotary else {}
            self.attn = blocks.attention(dim, cc.num_heads(dim), cc.qk_norm and inherited_kind, eps,
                                         scale_norm=cc.attn_norm and inherited_kind, **rope)
        if "MLP" in ops:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            if inherited_kind:
                act = cc.mlp_act or ("quick_gelu" if cc.clip_quick_gelu else "gelu")
                self.mlp = blocks.mlp(cc.mlp_layer, dim, cc.mlp_hidden_dim or 4 * dim, act,
                                      norm_eps=eps if cc.mlp_norm else None)
            else:
                self.mlp = blocks.mlp("mlp", dim, 4 * dim, "gelu")
        if "ROI_ADJ" in ops:
            if cc.type_op_adjust == 1:
                self.roi_adjust_module = nn.Sequential(
                    nn.LayerNorm(dim, eps=eps), nn.Linear(dim, 2 * ndim, bias=False)
                )
            else:
                self.roi_adjust_module = nn.Sequential(
                    nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2 * ndim, bias=False)
                )
        if "PE_INJECT" in ops:
            self.pe_transition = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim))
        self.drop_paths = nn.ModuleList(DropPath(r) if r > 0 else nn.Identity() for r in drop_path_rates)

    # ------------------------------------------------------------- the ops
    def adjust_roi(self, x: Tensor, roi: Tensor, drop_path: nn.Module) -> Tensor:
        """Move each RoI's centre by t[:n]*size and scale its size by exp(t[n:]), in float32."""
        t = self.roi_adjust_module(x)
        if self.type_op_adjust == 1:
            t = drop_path(t)
        t, roi = t.float(), roi.float()
        n = self.ndim
        centre, size = roi_centre_size(roi, n)
        size = size.abs()
        centre = centre + t[..., :n] * size
        size = size * torch.exp(t[..., n:])
        return torch.cat([centre - size / 2, centre + size / 2], dim=-1)

    def sampling_points(self, x: Tensor, roi: Tensor) -> Tensor:
        """Absolute sampling points [B, N, P, ndim] in normalised coordinates (broadcast over shared x, roi)."""
        offsets = self.roi_offset_module(x) + self.roi_offset_bias
        offsets = offsets.float().unflatten(-1, (self.num_points, self.ndim))
        # Standardise each coordinate over the P points (unbiased std).
        mean = offsets.mean(dim=-2, keepdim=True)
        std = offsets.std(dim=-2, keepdim=True)
        offsets = (offsets - mean) / (3 * (std + self.offset_std_eps))
        centre, size = roi_centre_size(roi.float(), self.ndim)  # signed size
        return centre[..., None, :] + offsets * size[..., None, :]

    def sample(self, feat: Tensor, points: Tensor) -> Tensor:
        """Bilinear samples of `feat` at `points` -> [B, N, P, C]."""
        if self.restrict_grad_norm and points.requires_grad:
            points = _ClampGrad.apply(points, 1.0 / feat.shape[-2])
        grid = (points * 2 - 1).to(feat.dtype)
        if self.ndim == 2:
            out = F.grid_sample(feat, grid, **self.grid_sample_kwargs)  # [B, C, N, P]
        else:
            out = F.grid_sample(feat, grid[:, :, :, None], **self.grid_sample_kwargs)[..., 0]
        return out.permute(0, 2, 3, 1)

    def position_encoding(self, roi: Tensor) -> Tensor:
        if self.ndim == 2:
            return roi_position_encoding(roi, self.dim)
        if self.video_roi_encoding == "xy":
            # A tube's spatial box (x1, y1, x2, y2), encoded as the image model encodes an RoI.
            return roi_position_encoding(roi[..., [0, 1, 3, 4]], self.dim)
        # The authors' video model: the RoI encoding is a zero vector (pe_transition still runs on it).
        return roi.new_zeros(*roi.shape[:-1], self.dim)

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor, roi: Tensor, feat: Tensor, trace: "SparseFormerTrace | None" = None,
                rope: Tensor | None = None):
        """x: [B, N, dim] tokens, roi: [B, N, 2*ndim] -> both updated. `rope`: a rotary block's rotations of
        the tokens after the class token (`SparseFormer.block_rotations`).

        The model's first unit receives the learned initial tokens and RoIs with a batch dimension
        of 1 (x: [1, 1 or N, dim], roi: [1, N, 2*ndim]): they are the same for every image. The ops
        that read only the tokens or RoIs and act on each token alone (stage embedding, sampling
        offsets, mixing parameters, RoI encoding) then run once and broadcast, which computes the
        same values; the first op that needs per-image tokens expands them. Speed only.
        """
        self._check_rope(rope)
        B = x.shape[0] if feat is None else feat.shape[0]
        N = x.shape[1] if roi is None else roi.shape[1]

        def per_image(x: Tensor, roi: Tensor | None) -> tuple[Tensor, Tensor | None]:
            # A class token, when present, makes x one longer than roi; shared tokens have length 1 or N.
            return x.expand(B, max(x.shape[1], N), -1), None if roi is None else roi.expand(B, N, -1)

        for r in range(self.repeats):
            if hasattr(self, "stage_embedding"):
                x = x + self.stage_embedding.weight[r]
            drop_path = self.drop_paths[r]
            for op in self.ops:
                if op == "SAMPLING_M":
                    points = self.sampling_points(x, roi).expand(B, N, -1, -1)
                    if trace is not None:
                        trace.rois.append(roi.detach().expand(B, N, -1))
                        trace.points.append(points.detach())
                    sampled = self.sample(feat, points)
                    x = x + drop_path(self.adaptive_mixing(x, sampled).to(x.dtype))
                    continue
                if op == "PE_INJECT":
                    pe = self.position_encoding(roi).to(x.dtype)
                    x = x + self.pe_transition(pe)
                    continue
                x, roi = per_image(x, roi)
                if op == "ATTN":
                    y = self.attn(self.norm1(x)) if rope is None else self.attn(self.norm1(x), rope=rope)
                    x = x + drop_path(y)
                elif op == "MLP":
                    x = x + drop_path(self.mlp(self.norm2(x)))
                elif op == "ROI_ADJ":
                    roi = self.adjust_roi(x, roi, drop_path)
        return per_image(x, roi)

    @property
    def is_block(self) -> bool:
        """A plain transformer block (ATTN, MLP, once): the inherited teacher blocks are such units."""
        return self.ops == ["ATTN", "MLP"] and self.repeats == 1

    def forward_class_token(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """`self(x)[0][:, :1]` for a block unit: the class token's update only (it still attends to all)."""
        self._check_rope(rope)
        drop_path = self.drop_paths[0]
        cls = x[:, :1] + drop_path(class_token_attention(self.attn, self.norm1(x), rope))
        return cls + drop_path(self.mlp(self.norm2(cls)))

    def _check_rope(self, rope: Tensor | None) -> None:
        if self.rotary and rope is None:
            raise ValueError("this block rotates its tokens' queries and keys by their positions (rotary position "
                             "embeddings): pass rope=, the rotations of SparseFormer.block_rotations(roi)")
        if rope is not None and not self.rotary:
            raise ValueError("rope= given to a block without rotary position embeddings")


@dataclass
class SparseFormerTrace:
    """What happened inside one forward pass, for visualisation and token-level uses.

    rois[k], points[k]: the RoIs [B, N, 2*ndim] and sampling points [B, N, P, ndim]
    at the k-th sampling step, in normalised coordinates.
    """

    rois: list[Tensor] = field(default_factory=list)
    points: list[Tensor] = field(default_factory=list)


@dataclass
class SparseFormerOutput:
    output: Tensor  # [B, output_dim]: head output (what forward() returns)
    pre_logits: Tensor  # [B, embed_dim]: pooled and normed, before `proj`
    tokens: Tensor  # [B, L, embed_dim]: every final token after `norm` (L = N, or N+1 with a class token)
    roi: Tensor  # [B, N, 2*ndim]: final RoIs, corner form
    rois: list[Tensor]  # RoIs at every sampling step, then the final RoIs
    points: list[Tensor]  # sampling points at every sampling step


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------
class SparseFormer(nn.Module):
    """SparseFormer for images `[B, 3, H, W]` (already normalised with the model's mean/std)."""

    ndim = 2  # RoI coordinates: x, y

    def __init__(self, config: SparseFormerConfig | Mapping[str, Any], replicates: int = 1):
        super().__init__()
        cfg = SparseFormerConfig.from_dict(config)
        if cfg.video is not None and self.ndim == 2:
            raise ValueError("this config describes a video student (its 'video' section): build it as a "
                             "MediaSparseFormer (students.student_from_config picks the class from the config)")
        self.config = cfg
        self.replicates = replicates
        if not isinstance(replicates, int) or replicates < 1:
            raise ValueError(f"replicates must be a positive integer, got {replicates!r}")
        n_tokens = cfg.num_latent_tokens * replicates

        self.feat_extractor = EarlyConvolution(cfg.conv_dim, self.ndim, cfg.compatible_config.imagenet_code_norms)
        self.initial_roi = nn.Embedding(n_tokens, 2 * self.ndim)
        self.initial_embedding = nn.Embedding(1 if cfg.same_token_embedding else n_tokens, cfg.width_configs[0])
        if cfg.has_cls_token:
            self.cls_embedding = nn.Embedding(1, cfg.embed_dim)

        total = sum(cfg.repeats)
        # Stochastic depth grows linearly over all repetitions of all units.
        rates = [cfg.drop_path_rate * i / (total - 1) for i in range(total)] if total > 1 else [0.0] * total
        self.first_block_unit = first_block_unit(cfg)
        layers, self.unit_layer_index = [], []
        prev, k = cfg.width_configs[0], 0
        for i, (width, ops, repeats) in enumerate(zip(cfg.width_configs, cfg.ops_list, cfg.repeats)):
            if width != prev:
                ln = nn.LayerNorm(width, eps=cfg.compatible_config.ln_eps) if cfg.compatible_config.transition_ln \
                    else nn.Identity()
                layers.append(nn.Sequential(nn.Linear(prev, width), ln))
            self.unit_layer_index.append(len(layers))
            rotary = cfg.rope is not None and i >= self.first_block_unit and "ATTN" in ops
            layers.append(SFUnit(width, ops, repeats, cfg, rates[k : k + repeats], self.ndim, rotary))
            prev, k = width, k + repeats
        self.layers = nn.ModuleList(layers)
        self.rotary, self.rope = self._rotary_positions(cfg)

        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.compatible_config.ln_eps)
        if cfg.head_op == "map":  # a MAP head (SigLIP): latent queries attend to the final tokens
            self.attn_pool = blocks.map_pool(cfg.embed_dim, cfg.pool_spec)
        self.proj = nn.Linear(cfg.embed_dim, cfg.proj_dim, bias=cfg.proj_bias) if cfg.proj_dim else nn.Identity()
        self.init_weights()

    def _rotary_positions(self, cfg: SparseFormerConfig) -> tuple[RotaryPositions | None, nn.Module | None]:
        """The blocks' rotary positions (`cfg.rope`), and its timm module (registered as `rope`: RoPE-Mixed's
        frequencies are weights)."""
        if cfg.rope is None:
            return None, None
        if self.ndim != 2:
            raise ValueError(f"a {type(self).__name__} cannot hold rotary position embeddings (rope): its latent "
                             f"tokens' positions are read from image RoIs, and a video student's are tubes. Bootstrap "
                             f"video students from a teacher with learned position embeddings (CLIP, SigLIP, DINOv2), "
                             f"or drop student.video")
        if self.num_blocks == 0:
            raise ValueError("rope: rotary positions are given to the blocks after the last RoI op, and this "
                             "configuration has none")
        heads = cfg.compatible_config.num_heads(cfg.embed_dim)
        rotary = RotaryPositions.from_spec(cfg.rope, num_heads=heads, head_dim=cfg.embed_dim // heads,
                                           num_prefix_tokens=int(cfg.has_cls_token), depth=self.num_blocks)
        return rotary, rotary.module

    def block_rotations(self, roi: Tensor) -> list[Tensor]:
        """The rotations each block after the last RoI op gives the latent tokens whose RoIs are `roi` [B, N, 4]
        (`teachers.rope.RotaryPositions.rotations`): a token sits at its RoI's centre on the teacher's patch grid,
        so a token whose RoI is one patch gets that patch's rotation in the teacher; the class token is a prefix
        token, left unrotated as in the teacher. RoPE-Mixed's rotations differ by block: block j's are those of
        the teacher block it was inherited from. No gradient flows into the RoIs, as for PE_INJECT's encoding."""
        if self.rotary is None:
            raise ValueError("this SparseFormer has no rotary position embeddings (config.rope is None)")
        centre, _ = roi_centre_size(roi.detach().float(), self.ndim)
        positions = self.rotary.from_image(centre)
        if self.rotary.per_block:
            return [self.rotary.rotations(positions, j) for j in range(self.num_blocks)]
        return [self.rotary.rotations(positions)] * self.num_blocks

    # ------------------------------------------------------------- builders
    @classmethod
    def from_config(cls, config: SparseFormerConfig | Mapping[str, Any], **extra) -> "SparseFormer":
        return cls(config, **extra)

    @property
    def num_tokens(self) -> int:
        return self.initial_roi.num_embeddings

    @property
    def num_features(self) -> int:
        return self.config.embed_dim

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_blocks(self) -> int:
        """The blocks `forward_tokens` counts (see there): the trailing units over the final token set."""
        return self.config.num_units - self.first_block_unit

    @property
    def restricts_gradients(self) -> bool:
        """Whether the sampling points' gradients are clamped (`restrict_grad_norm`): the clamp bound is for
        unscaled gradients, so fp16 training with a gradient scaler would clamp them far too hard."""
        return self.config.compatible_config.restrict_grad_norm

    @property
    def num_classes(self) -> int:
        return self.proj.out_features if isinstance(self.proj, nn.Linear) else 0

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm convention: `num_classes=0` makes `forward` return the pooled, normed features."""
        own = {"cls": ("token", "cls"), "avg": ("avg",), "map": ("map",)}[self.config.head_op]
        if global_pool not in (None, "", *own):
            raise ValueError(f"this SparseFormer pools by {own[0]!r}; reset_classifier keeps its pooling "
                             f"(global_pool '' or {own[0]!r}), not {global_pool!r}")
        self.proj = nn.Linear(self.embed_dim, num_classes, bias=self.config.proj_bias) if num_classes else nn.Identity()
        self.config.proj_dim = num_classes

    # --------------------------------------------------------------- init
    def init_weights(self) -> None:
        """Initialisation for training from a fresh start (design note, section 6)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.initial_embedding.weight, std=1.0)
        self._init_rois()
        for layer in self.layers:
            if not isinstance(layer, SFUnit):
                continue
            dim = layer.dim
            if hasattr(layer, "roi_adjust_module"):
                nn.init.zeros_(layer.roi_adjust_module[-1].weight)
                nn.init.constant_(layer.roi_adjust_module[0].weight, 1 / math.sqrt(dim))
            if hasattr(layer, "roi_offset_module"):
                nn.init.zeros_(layer.roi_offset_module[-1].weight)
                nn.init.constant_(layer.roi_offset_module[0].weight, 1 / math.sqrt(dim))
                self._init_offset_bias(layer.roi_offset_bias, layer.num_points, layer.ndim)
            if hasattr(layer, "adaptive_mixing"):
                am = layer.adaptive_mixing
                gen = am.parameter_generator[-1]
                nn.init.zeros_(gen.weight)
                c2 = am.conv_dim * am.conv_dim
                with torch.no_grad():
                    b_c = torch.empty(am.conv_dim, am.conv_dim)
                    b_s = torch.empty(am.out_points, am.num_points)
                    nn.init.xavier_uniform_(b_c)
                    nn.init.xavier_uniform_(b_s)
                    gen.bias[:c2].copy_(b_c.flatten())
                    gen.bias[c2:].copy_(b_s.flatten())
                nn.init.constant_(am.parameter_generator[0].weight, 1 / math.sqrt(dim))

    def _grid_rois(self, n: int) -> Tensor:
        """Whole-image RoIs, the first k*k of them a k x k grid of half-size boxes."""
        roi = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(n, 1)
        k = int(math.floor(math.sqrt(n)))
        for i in range(k):
            for j in range(k):
                x1 = i / (k - 1) * 0.5 if k > 1 else 0.25
                y1 = j / (k - 1) * 0.5 if k > 1 else 0.25
                roi[i * k + j] = torch.tensor([x1, y1, x1 + 0.5, y1 + 0.5])
        return roi

    def _init_rois(self) -> None:
        with torch.no_grad():
            self.initial_roi.weight.copy_(self._grid_rois(self.num_tokens))

    @staticmethod
    def _offset_grid(num_points: int) -> Tensor:
        k = int(round(math.sqrt(num_points)))
        if k * k == num_points:
            ticks = (torch.arange(k, dtype=torch.float32) + 0.5) / k - 0.5
            yy, xx = torch.meshgrid(ticks, ticks, indexing="ij")
            return torch.stack([xx.flatten(), yy.flatten()], dim=-1)
        return torch.rand(num_points, 2) - 0.5

    def _init_offset_bias(self, bias: Tensor, num_points: int, ndim: int) -> None:
        with torch.no_grad():
            bias.copy_(self._offset_grid(num_points).flatten())

    # ------------------------------------------------------------ forward
    def _check_input(self, images: Tensor) -> None:
        expected = 4 if self.ndim == 2 else 5
        layout = "[B, 3, H, W]" if self.ndim == 2 else "[B, 3, T, H, W]"
        if not isinstance(images, Tensor) or images.dim() != expected:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__} expects images {layout}, got {shape}")
        if images.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects 3 image channels (RGB) in dim 1 of {layout}, "
                f"got shape {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
            raise ValueError(
                f"images of {h}x{w} are smaller than the early convolution's {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
                f"kernel (shape {tuple(images.shape)}); resize them to at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
            )

    def _initial_tokens(self) -> tuple[Tensor, Tensor]:
        """The learned initial tokens [1, 1 or N, dim] and RoIs [1, N, 2*ndim], shared by every image."""
        return self.initial_embedding.weight[None], self.initial_roi.weight[None]

    def forward_features(self, images: Tensor, trace: SparseFormerTrace | None = None,
                         class_token_only: bool = False, hidden_states: list[Tensor] | None = None,
                         stop_after_block: int | None = None) -> tuple[Tensor, Tensor]:
        """Final tokens before `norm` [B, L, embed_dim], and final RoIs [B, N, 2*ndim].

        `class_token_only`: when the head reads only the class token and the last unit is a plain
        block, that block updates only the class token (the same value; ~9/12 of a block's work
        saved) and the tokens returned are [B, 1, embed_dim]. The final RoIs are unaffected.
        `hidden_states`: a list that receives the tokens entering the first block and those leaving
        each block (`forward_tokens`); `stop_after_block=k` returns once k blocks have run.
        """
        self._check_input(images)
        feat = self.feat_extractor(images)
        x, roi = self._initial_tokens()
        if torch.is_grad_enabled():
            # With gradients, per-image copies from the start: the gradients of the shared first pass
            # would otherwise be summed in another order, and the golden train-mode gradients of the
            # RoI-adjust head (a sum of many cancelling terms) agree only to ~1e-5 as it is.
            x, roi = x.expand(images.shape[0], roi.shape[1], -1), roi.expand(images.shape[0], -1, -1)
        last = self.layers[-1]
        class_token_only = class_token_only and self.config.head_op == "cls" and last.is_block
        unit = 0
        rotations = None  # the rotary blocks', from the final RoIs (the blocks follow the last RoI op)
        for layer in self.layers:
            if isinstance(layer, SFUnit):
                if unit == self.config.cls_token_insert_layer and self.config.has_cls_token:
                    x = x.expand(images.shape[0], roi.shape[1], -1)
                    cls = self.cls_embedding.weight.to(x.dtype).expand(x.shape[0], 1, -1)
                    x = torch.cat([cls, x], dim=1)
                if unit == self.first_block_unit and (hidden_states is not None or stop_after_block == 0):
                    x, roi = _per_image(x, roi, images.shape[0])
                    if hidden_states is not None:
                        hidden_states.append(x)
                    if stop_after_block == 0:
                        return x, roi
                rope = None
                if layer.rotary:
                    rotations = self.block_rotations(roi) if rotations is None else rotations
                    rope = rotations[unit - self.first_block_unit]
                if layer is last and class_token_only:
                    x = layer.forward_class_token(x, rope)
                else:
                    x, roi = layer(x, roi, feat, trace, rope=rope)
                unit += 1
                if unit > self.first_block_unit:
                    if hidden_states is not None:
                        hidden_states.append(x)
                    if unit - self.first_block_unit == stop_after_block:
                        return x, roi
            else:  # width transition
                x = layer(x)
        if hidden_states is not None and not hidden_states:  # no blocks: the final tokens alone
            x, roi = _per_image(x, roi, images.shape[0])
            hidden_states.append(x)
        return x, roi

    def _pooling(self) -> tuple[str, int, nn.Module | None]:
        """`blocks.pool_tokens`'s pool, prefix count and MAP head for this model's head op."""
        cfg = self.config
        prefix = 0 if cfg.pool_include_prefix else int(cfg.has_cls_token)
        return HEAD_OP_TO_POOL[cfg.head_op], prefix, getattr(self, "attn_pool", None)

    def pool(self, tokens: Tensor) -> Tensor:
        """The class token ('cls'), or the mean ('avg') or MAP head ('map') over the latent tokens."""
        return blocks.pool_tokens(tokens, *self._pooling())

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and `norm` (in the config's order, `norm_before_pool`), then `proj` (skipped with pre_logits)."""
        pool, prefix, attn_pool = self._pooling()
        x = blocks.pool_and_norm(tokens, pool, prefix, self.norm, self.config.norm_before_pool, attn_pool)
        return x if pre_logits else self.proj(x)

    def forward(self, images: Tensor, pre_logits: bool = False) -> Tensor:
        """The head output [B, proj_dim] (with pre_logits: the pooled, normed feature [B, embed_dim])."""
        tokens, _ = self.forward_features(images, class_token_only=True)
        return self.forward_head(tokens, pre_logits=pre_logits)

    def forward_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_logits, output)`` of one pass: the pooled, normed feature and the head's output."""
        pre = self.forward_head(self.forward_features(images, class_token_only=True)[0], pre_logits=True)
        return pre, self.proj(pre)

    def no_weight_decay(self) -> set[str]:
        """The parameters exempt from weight decay besides 1-D ones and biases (timm's convention): the
        initial RoIs, the class and stage embeddings, RoPE-Mixed's frequencies (as timm's Eva), and the initial
        token embedding where it is one vector shared by every token (as a class token). Per-token embeddings (v1)
        decay, as the authors' training code decays them (it exempts only the RoIs, norms and biases)."""
        embeddings = ("initial_roi.", "cls_embedding.", "rope.") + (
            ("initial_embedding.",) if self.config.same_token_embedding else ())
        return {name for name, _ in self.named_parameters()
                if name.startswith(embeddings) or ".stage_embedding." in name}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (its layer-wise lr decay): the stem (early convolution, initial tokens and RoIs,
        class embedding), then each layer in order; the final norm and the head come last."""
        return dict(stem=r"^feat_extractor|^initial_|^cls_embedding", blocks=[(r"^layers\.(\d+)", None)])

    def forward_tokens(self, images: Tensor, layer: int = -1, class_token: bool = True) -> Tensor:
        """The tokens after a block, [B, N, embed_dim] (N latent tokens, +1 with the class token first).

        `layer` indexes the hidden states the way LLaVA's `mm_vision_select_layer` and transformers'
        `hidden_states[layer]` do: 0 is the tokens entering the first block, k the tokens after k blocks,
        negative counts from the end (-2: after the penultimate block, LLaVA's choice). `layer=-1`
        alone is the model's output tokens, after the final `norm` (as `forward_details().tokens`);
        every other index, `num_blocks` included, is a block's raw output.

        A "block" of a SparseFormer is one of its trailing units that keep the final token set: at
        the final width, without RoI ops, after the class token is inserted. In a bootstrapped
        student these are exactly the blocks inherited from the teacher, so `layer` names the same
        block in student and teacher (-2 is the teacher's block -2 in both); in v1 models they are the
        plain transformer blocks after the focusing units. The units before them change the tokens'
        number or width, so their tokens are not a hidden state of the same kind.

        `class_token=False` drops the class token (where the model has one): the latent tokens only.
        Layers after `layer` are not run.
        """
        index = hidden_state_index(layer, self.num_blocks, f"this {type(self).__name__}")
        states: list[Tensor] = []
        self.forward_features(images, hidden_states=states, stop_after_block=index)
        x = states[index]
        if layer == -1:
            x = self.norm(x)
        if not class_token and self.config.has_cls_token:
            x = x[:, 1:]
        return x

    def forward_hidden_states(self, images: Tensor) -> list[Tensor]:
        """Every hidden state `forward_tokens` can select, from one pass: `num_blocks + 1` tensors
        [B, L, embed_dim] (class token first), raw; the last is the final tokens before `norm`."""
        states: list[Tensor] = []
        self.forward_features(images, hidden_states=states)
        return states

    def forward_details(self, images: Tensor) -> SparseFormerOutput:
        """Output plus final normed tokens and the RoIs/sampling points of every stage."""
        trace = SparseFormerTrace()
        tokens, roi = self.forward_features(images, trace)
        pre = self.forward_head(tokens, pre_logits=True)
        return SparseFormerOutput(
            output=self.proj(pre),
            pre_logits=pre,
            tokens=self.norm(tokens),
            roi=roi,
            rois=trace.rois + [roi.detach()],
            points=trace.points,
        )


def _per_image(x: Tensor, roi: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Tokens and RoIs shared by every image (batch 1, see `SFUnit.forward`) as a batch of `batch`."""
    return x.expand(batch, max(x.shape[1], roi.shape[1]), -1), roi.expand(batch, -1, -1)


def first_block_unit(cfg: SparseFormerConfig) -> int:
    """Index of the first unit of the trailing run that keeps the final token set (`forward_tokens`):
    units at the final width, without RoI ops, at or after the class token's insertion."""
    start = cfg.num_units
    while start > 0:
        i = start - 1
        if (cfg.width_configs[i] != cfg.embed_dim or any(op in ROI_OPS for op in cfg.ops_list[i])
                or (cfg.has_cls_token and i < cfg.cls_token_insert_layer)):
            break
        start = i
    return start


class MediaSparseFormer(SparseFormer):
    """SparseFormer for video `[B, 3, T, H, W]`: RoIs are tubes (x1, y1, t1, x2, y2, t2).

    `replicates = r` multiplies the tokens block-wise: token `k*N + i` is copy k of image token i.
    A config with a `video` section (`VideoConfig`: a video student of this project) fixes `replicates`,
    takes clips in its `layout` (`frames_first`: `[B, T, 3, H, W]`, as the data and the teachers over
    frames give them) and encodes RoIs by its `roi_encoding`; without one it is the authors' model.
    """

    ndim = 3

    def __init__(self, config: SparseFormerConfig | Mapping[str, Any], replicates: int | None = None):
        cfg = SparseFormerConfig.from_dict(config)
        if cfg.video is not None:
            if replicates not in (None, cfg.video.replicates):
                raise ValueError(f"replicates={replicates} differs from the config's video.replicates="
                                 f"{cfg.video.replicates}; leave replicates out")
            replicates = cfg.video.replicates
        super().__init__(cfg, 1 if replicates is None else replicates)

    @property
    def frames_first(self) -> bool:
        """Whether clips come as `[B, T, 3, H, W]` (the config's `video.layout`) rather than `[B, 3, T, H, W]`."""
        return self.config.video is not None and self.config.video.layout == "frames_first"

    def forward_features(self, images: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.frames_first:
            if not isinstance(images, Tensor) or images.dim() != 5 or images.shape[2] != 3:
                shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
                hint = (" (this looks like [B, 3, T, H, W]: pass clips.transpose(1, 2))"
                        if isinstance(images, Tensor) and images.dim() == 5 and images.shape[1] == 3 else
                        " (one clip? pass clip[None])" if isinstance(images, Tensor) and images.dim() == 4 else "")
                raise ValueError(f"this video student takes clips [B, T, 3, H, W] (frames first, as the data and "
                                 f"teachers give them), got {shape}{hint}")
            images = images.transpose(1, 2)
        return super().forward_features(images, *args, **kwargs)

    def _init_rois(self) -> None:
        n, r = self.config.num_latent_tokens, self.replicates
        with torch.no_grad():
            self.initial_roi.weight.copy_(_inflate_rois(self._grid_rois(n), r))

    def _init_offset_bias(self, bias: Tensor, num_points: int, ndim: int) -> None:
        with torch.no_grad():
            grid = self._offset_grid(num_points)
            bias.copy_(torch.cat([grid, torch.zeros(num_points, 1)], dim=1).flatten())

    def load_2d_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load the weights of an image SparseFormer, inflated to video (design note, section 7)."""
        return self.load_state_dict(inflate_state_dict(state_dict, self.config, self.replicates), strict=strict)


def model_class(config: SparseFormerConfig | Mapping[str, Any]) -> type[SparseFormer]:
    """The class a config builds: `MediaSparseFormer` for a video student's config (its `video` section)."""
    return MediaSparseFormer if SparseFormerConfig.from_dict(config).video is not None else SparseFormer


def _inflate_rois(roi2d: Tensor, replicates: int) -> Tensor:
    """[N, 4] image RoIs -> [N*r, 6] tubes; copy k spans the k-th of r equal time segments."""
    n = roi2d.shape[0]
    out = []
    for k in range(replicates):
        t_centre = (k + 0.5) / replicates
        t1 = torch.full((n, 1), t_centre - 0.5 / replicates, dtype=roi2d.dtype)
        t2 = torch.full((n, 1), t_centre + 0.5 / replicates, dtype=roi2d.dtype)
        out.append(torch.cat([roi2d[:, :2], t1, roi2d[:, 2:], t2], dim=1))
    return torch.cat(out, dim=0)


def _insert_zero_time(t: Tensor, num_points: int) -> Tensor:
    """Rows/values laid out as (x, y) per point gain a zero t entry: (x, y, 0) per point."""
    xy = t.reshape(num_points, 2, *t.shape[1:])
    zeros = torch.zeros(num_points, 1, *t.shape[1:], dtype=t.dtype)
    return torch.cat([xy, zeros], dim=1).reshape(num_points * 3, *t.shape[1:])


def inflate_state_dict(state_dict: Mapping[str, Tensor], config: SparseFormerConfig, replicates: int) -> dict:
    """Map an image SparseFormer state dict to its MediaSparseFormer equivalent."""
    cfg = SparseFormerConfig.from_dict(config)
    P = cfg.num_sampling_points
    out = {}
    for key, v in state_dict.items():
        if key == "feat_extractor.conv1.weight":
            v = v.unsqueeze(2)  # kernel gains a time axis of size 1
        elif key == "initial_roi.weight":
            v = _inflate_rois(v, replicates)
        elif key == "initial_embedding.weight" and not cfg.same_token_embedding:
            v = v.repeat(replicates, 1)
        elif key.endswith(".roi_offset_bias"):
            v = _insert_zero_time(v, P)
        elif key.endswith("roi_offset_module.1.weight"):
            v = _insert_zero_time(v, P)
        elif ".roi_adjust_module." in key and key.endswith(".weight") and v.dim() == 2 and v.shape[0] == 4:
            # (dx, dy, dw, dh) -> (dx, dy, 0, dw, dh, 0)
            z = torch.zeros(1, v.shape[1], dtype=v.dtype)
            v = torch.cat([v[:2], z, v[2:], z], dim=0)
        out[key] = v
    return out
