"""Token Merging (ToMe; Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) on a teacher.

A training-free baseline beside the bootstrapped students: the teacher itself, made cheaper by
merging ``r`` tokens in every block. In each block, between the attention and the MLP:

1. *Bipartite soft matching* on the attention's keys (averaged over heads): the tokens are split
   alternately into sets A (even positions) and B (odd positions); each token of A finds its
   most cosine-similar token of B; the ``r`` A tokens with the most similar partners are merged
   into them. The class token and any other prefix tokens (registers) never merge and no token
   merges into them; a tower without them (SigLIP) may merge any token. With qk-norm the keys are
   the normed ones, as the attention's. The tokens leave in the order the next block's split uses, as
   in the authors' code: the prefix tokens, the kept A tokens, the B tokens; the kept A tokens in token
   order where prefix tokens are protected, else in the order of their best similarity.
2. *Size-weighted merging*: every token carries its size ``s`` (how many patches it stands
   for, 1 at first); a merged token is the size-weighted mean of its members, of size their sum.
3. *Proportional attention*: ``softmax(q k^T / sqrt(d) + log s)``, so that a token of size ``s``
   weighs in the attention as ``s`` copies of itself would.

As in the authors' code (facebookresearch/ToMe), a block merges at most half of the patch
tokens it receives: a larger ``r`` is capped there (``ToMe.schedule`` gives what each block
merges, ``ToMe.token_counts`` the tokens leaving each block). A request that would merge away
every patch token is refused, with the largest valid constant ``r`` for the model.

At the end the teacher's own head path runs on the merged tokens: its final norm, its pooling (the
class token, the mean of the patch tokens, or its MAP head) and its head, in the teacher's order
(`norm` before pooling or `fc_norm` after it); the mean is over the merged tokens, unweighted by their
sizes, as timm's head computes it under the authors' patch.

    from eval.baselines.tome import ToMe, schedule
    tome = ToMe(teacher, r=8)                      # 8 tokens per block
    tome = ToMe(teacher, schedule(teacher.depth, 16, inflect=-0.5))  # ToMe's decreasing schedule
    emb = tome.embed(images)                       # what teacher.embed(images) is, merged

``ToMe`` wraps the teacher and runs its own modules (``Teacher.block_modules``): no weight is
copied, changed or patched, and at ``r = 0`` it computes what the teacher computes. On a timm
ViT its logits agree with the authors' ``tome.patch.timm`` to 1e-7, with a class token and without
one (mean and MAP pooling), capped schedules too (``tests/fixtures/tome_reference``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from data.errors import UserError

from .head import TeacherHead, TeacherVariant

__all__ = ["Matching", "TeacherHead", "ToMe", "ToMeError", "bipartite_soft_matching", "fraction_schedule", "max_r",
           "merge_weighted", "plan", "schedule", "tome_block"]

R = Union[int, Sequence[int]]


class ToMeError(UserError, ValueError):
    """A merging schedule the model cannot run."""


# ----------------------------------------------------------------------------- schedules
def schedule(depth: int, r: int, inflect: float = 0.0) -> list[int]:
    """ToMe's schedule of ``r`` per block over ``depth`` blocks.

    ``inflect = 0``: ``r`` in every block. ``inflect < 0``: decreasing, from ``r * (1 - inflect)``
    in the first block to ``r * (1 + inflect)`` in the last (same total); ``inflect > 0``: increasing.
    """
    if depth < 1:
        raise ToMeError(f"a schedule needs at least one block, got depth {depth}")
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    step = (last - first) / (depth - 1) if depth > 1 else 0.0
    return [int(first + step * i) for i in range(depth)]


def fraction_schedule(num_patches: int, depth: int, fraction: float) -> list[int]:
    """Merge the same ``fraction`` (at most 0.5) of the patch tokens each block receives: front-loaded,
    for reductions ToMe's linear schedules cannot reach (their total stays below the patch count)."""
    if not 0 <= fraction <= 0.5:
        raise ToMeError(f"a block merges at most half of its patch tokens: fraction must be in [0, 0.5], "
                        f"got {fraction}")
    rs, patches = [], num_patches
    for _ in range(depth):
        r = min(int(fraction * patches + 0.5), patches // 2)  # never the last patch token
        rs.append(r)
        patches -= r
    return rs


def max_r(num_patches: int, depth: int) -> int:
    """The largest constant ``r`` that leaves at least one patch token after ``depth`` blocks."""
    return max(0, (num_patches - 1) // depth)


def _per_block(r: R, depth: int) -> list[int]:
    if isinstance(r, bool) or not isinstance(r, (int, Sequence)) or isinstance(r, str):
        raise ToMeError(f"ToMe r must be an int (tokens merged per block) or a list of {depth} ints, got {r!r}")
    rs = [r] * depth if isinstance(r, int) else list(r)
    if len(rs) != depth or not all(isinstance(x, int) and not isinstance(x, bool) for x in rs):
        raise ToMeError(f"a ToMe schedule needs one int per block ({depth} blocks), got {list(rs)!r}")
    if any(x < 0 for x in rs):
        raise ToMeError(f"ToMe r cannot be negative, got {list(rs)!r}")
    return rs


def plan(r: R, num_patches: int, depth: int, num_prefix_tokens: int = 1, model: str = "the model"):
    """``(schedule, token_counts)``: what each block merges and the tokens leaving each block.

    A block merges at most half of the patch tokens it receives (ToMe's cap). Raises
    ``ToMeError`` where ``r`` would merge away every patch token, naming the largest valid ``r``.
    """
    rs = _per_block(r, depth)
    if sum(rs) >= num_patches:
        asked = f"r={r}" if isinstance(r, int) else f"the schedule {rs}"
        raise ToMeError(
            f"ToMe {asked} would merge away every patch token of {model}: {sum(rs)} merges over {depth} blocks, "
            f"but the model has {num_patches} patch tokens. The largest valid r for this model is "
            f"{max_r(num_patches, depth)} per block (or a schedule merging at most {num_patches - 1} in all)")
    patches, effective, counts = num_patches, [], []
    for ri in rs:
        ri = min(ri, patches // 2)
        patches -= ri
        effective.append(ri)
        counts.append(num_prefix_tokens + patches)
    return effective, counts


# ----------------------------------------------------------------------------- matching
@dataclass
class Matching:
    """One merge step found by ``bipartite_soft_matching`` (indices into the A and B sets)."""

    unmerged: Tensor  # [B, |A| - r, 1] A tokens kept: in token order (prefix tokens first), or without prefix
    #                   tokens in the order of their best similarity, highest first (as the authors' code)
    src: Tensor  # [B, r, 1] A tokens merged away
    dst: Tensor  # [B, r, 1] the B token each of them merges into
    num_prefix: int

    def merge(self, x: Tensor, mode: str = "sum") -> Tensor:
        """``x`` [B, T, C] reduced to [B, T - r, C]: each src row reduced (``mode``) into its dst row.

        Order: the prefix tokens (their original order), the kept A tokens (``unmerged``), then the B tokens.
        """
        a, b = x[:, ::2], x[:, 1::2]
        n, ta, c = a.shape
        r = self.src.shape[1]
        kept = a.gather(1, self.unmerged.expand(n, ta - r, c))
        b = b.scatter_reduce(1, self.dst.expand(n, r, c), a.gather(1, self.src.expand(n, r, c)), reduce=mode)
        pa, pb = (self.num_prefix + 1) // 2, self.num_prefix // 2  # prefix tokens in A (even) and B (odd)
        prefix = torch.cat([kept[:, :pa], b[:, :pb]], dim=1)
        if self.num_prefix > 2:  # back to the original order 0, 1, 2, ... (a no-op for one or two)
            prefix = prefix[:, _prefix_order(self.num_prefix, x.device)]
        return torch.cat([prefix, kept[:, pa:], b[:, pb:]], dim=1)


def _prefix_order(p: int, device) -> Tensor:
    return torch.argsort(torch.cat([torch.arange(0, p, 2), torch.arange(1, p, 2)])).to(device)


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 1) -> Matching:
    """Which ``r`` tokens merge into which (ToMe's bipartite soft matching on ``metric`` [B, T, C]).

    The first ``num_prefix`` tokens (class token, registers) take no part. Needs
    ``r <= (T - num_prefix) // 2``.
    """
    t = metric.shape[1]
    if not 0 <= r <= (t - num_prefix) // 2:
        raise ToMeError(f"bipartite matching merges at most {(t - num_prefix) // 2} of {t - num_prefix} "
                        f"patch tokens, asked for {r}")
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, |A|, |B|] cosine similarities
        scores[:, :(num_prefix + 1) // 2, :] = -math.inf  # prefix tokens of A (even positions) do not merge
        scores[:, :, :num_prefix // 2] = -math.inf  # nothing merges into prefix tokens of B (odd positions)
        best, partner = scores.max(dim=-1)
        # Stable: equal similarities merge in token order, so a result never depends on the sort kernel.
        order = best.argsort(dim=-1, descending=True, stable=True)[..., None]
        src, unmerged = order[:, :r], order[:, r:]
        if num_prefix:  # As the authors: back to token order only to keep the protected tokens first. Without
            unmerged = unmerged.sort(dim=1).values  # them the kept tokens stay in matching order, which decides
        # the sets A and B of the next block (the pooling, a mean or a MAP head, does not depend on the order).
        dst = partner[..., None].gather(1, src)
    return Matching(unmerged=unmerged, src=src, dst=dst, num_prefix=num_prefix)


def merge_weighted(matching: Matching, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Size-weighted merge: ``(sum of s * x) / (sum of s)`` over each merged group, and the summed sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
        weighted = torch.cat([x, size], dim=-1)
    else:
        weighted = torch.cat([x * size, size], dim=-1)
    merged = matching.merge(weighted, mode="sum")  # sizes ride along as one more channel: one gather/scatter
    x, size = merged[..., :-1], merged[..., -1:]
    return x / size, size


# ----------------------------------------------------------------------------- the block
def tome_block(parts, x: Tensor, size: Tensor | None, r: int, num_prefix: int = 1,
               prop_attn: bool = True) -> tuple[Tensor, Tensor | None]:
    """One teacher block (``teachers.BlockModules``) on tokens ``x`` [B, T, C] of sizes ``size`` [B, T, 1]
    (None: all 1), merging ``r`` tokens between attention and MLP. Returns ``(x, size)``."""
    n, t, c = x.shape
    heads = parts.num_heads
    qkv = F.linear(parts.norm1(x), parts.qkv_weight, parts.qkv_bias)
    q, k, v = qkv.reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = parts.q_norm(q), parts.k_norm(k)  # qk-norm (identities without it)
    bias = None
    if prop_attn and size is not None:
        bias = size.log()[:, None, None, :, 0].to(q.dtype)  # [B, 1, 1, T]: + log s on every key's logit
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    x = x + parts.ls1(parts.proj(a.transpose(1, 2).reshape(n, t, c)))
    if r > 0:
        x, size = merge_weighted(bipartite_soft_matching(k.mean(dim=1), r, num_prefix), x, size)
    x = x + parts.ls2(parts.mlp(parts.norm2(x)))
    return x, size


# ----------------------------------------------------------------------------- the model
class ToMe(TeacherVariant):
    """A teacher with Token Merging: ``r`` tokens merged per block (an int, or one int per block).

    Same outputs as the students: ``forward(images, pre_logits=False)`` is the head output (CLIP:
    the projected embedding; supervised: the classifier logits), with ``pre_logits`` the pooled,
    normed feature (class token, mean or MAP head, as the teacher pools); ``embed(images)`` is what
    ``teacher.embed`` returns. ``schedule``: the tokens merged in each block (after ToMe's cap);
    ``token_counts``: the tokens leaving each block. ``prop_attn=False`` leaves out proportional
    attention (for ablations).
    """

    def __init__(self, teacher, r: R = 0, *, prop_attn: bool = True):
        if teacher.rope is not None:
            raise ToMeError(f"ToMe cannot run on {teacher.kind}:{teacher.name}: its blocks rotate each token by its "
                            f"position on the patch grid (rotary position embeddings), and merged tokens have no "
                            f"single position")
        super().__init__(teacher)
        self.requested = r if isinstance(r, int) else list(r)
        self.schedule, self.token_counts = plan(r, teacher.num_patches, teacher.depth, teacher.num_prefix_tokens,
                                                f"{teacher.kind}:{teacher.name}")
        self.prop_attn = prop_attn
        self.train(False)

    @property
    def name(self) -> str:
        r = self.requested
        return f"ToMe r={r}" if isinstance(r, int) else f"ToMe r={','.join(map(str, r))}"

    def forward_features(self, images: Tensor, every_block: list | None = None) -> tuple[Tensor, Tensor | None]:
        """Tokens leaving the last block [B, token_counts[-1], width] and their sizes [B, T, 1]
        (None when nothing merged). ``every_block``: a list to append each block's ``(tokens, sizes)`` to."""
        x = self.teacher.embed_tokens(images)
        size = None
        for i, r in enumerate(self.schedule):
            x, size = tome_block(self.teacher.block_modules(i), x, size, r, self.teacher.num_prefix_tokens,
                                 self.prop_attn)
            if every_block is not None:
                every_block.append((x, size))
        return x, size

    def extra_repr(self) -> str:
        return (f"r={self.requested}, schedule={self.schedule}, token_counts={self.token_counts}, "
                f"prop_attn={self.prop_attn}")
