"""Rotary position embeddings (RoPE) of timm `Eva` towers, described so that a token anywhere on the patch grid
can be given the rotation the teacher would give it.

A rotary teacher (EVA-02, PE-Core, DINOv3, RoPE-ViT) rotates each head's query and key of every token after the
prefix tokens (class token, registers) by angles that depend on the token's position on the patch grid; the
prefix tokens are not rotated. timm computes the rotations of the whole grid once, in one of three ways
(`rope_type` of `timm.models.eva.Eva`, modules in `timm.layers.pos_embed_sincos`):

    'cat'     RotaryEmbeddingCat: axial frequencies `bands`; a patch at index i along an axis sits at
              (i + grid_offset), rescaled by ref_feat_shape / feat_shape (EVA-02, PE-Core, timm's SBB RoPE ViTs)
    'dinov3'  RotaryEmbeddingDinoV3: a patch's centre (i + 0.5 + grid_offset) normalised to [-1, 1] by the grid
              size, angles 2 pi x / periods (DINOv3)
    'mixed'   RotaryEmbeddingMixed: learned frequencies per block and head mixing both axes (RoPE-Mixed)

Each is a linear function of the position, so it extends to fractional positions as it stands: `RotaryPositions`
computes it for any (row, col) on the grid, with the patch in row i and column j at (i, j). At those integer
positions it computes the same floating-point operations as timm, in the same order, so its rotations are the
teacher's own bit for bit (on the CPU; tests check it). Any other rotary module, or an option of a known one this
description does not follow, is refused (`rope_problems`) rather than described wrongly.

A student that inherits rotary blocks keeps a rotary module of its own, rebuilt from plain data (`spec()`, the
arguments of timm's constructor, saved in the student's config; `from_spec`), so that it reloads from its config
and weights alone; the one learned part, RoPE-Mixed's frequencies, is a weight (`weights(blocks)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ROPE_KINDS", "ROPE_SPEC_KEYS", "RotaryPositions", "rope_kind", "rope_problems", "rotate_after_prefix",
           "spec_problem"]

# timm's rope_type of each known rotary module class (looked up by exact class: a subclass may compute otherwise).
ROPE_KINDS = {"RotaryEmbeddingCat": "cat", "RotaryEmbeddingMixed": "mixed", "RotaryEmbeddingDinoV3": "dinov3"}
_NORMALIZE_COORDS = ("separate", "min", "max")
# The keys of a rotary spec (`RotaryPositions.spec`) of each kind: the grid, the layout, and the arguments of timm's
# constructor that the rotations depend on (the coordinate augmentations, training-only, are left out: off).
_COMMON_SPEC_KEYS = ("kind", "grid_size", "rotate_half", "grid_indexing")
ROPE_SPEC_KEYS = {
    "cat": _COMMON_SPEC_KEYS + ("temperature", "in_pixels", "max_res", "linear_bands", "grid_offset",
                                "ref_feat_shape"),
    "dinov3": _COMMON_SPEC_KEYS + ("temperature", "min_period", "max_period", "normalize_coords", "grid_offset"),
    "mixed": _COMMON_SPEC_KEYS + ("temperature",),
}


def rope_kind(module: nn.Module) -> str | None:
    """'cat' | 'mixed' | 'dinov3' for a timm rotary module of a known class, else None."""
    from timm.layers import pos_embed_sincos

    name = type(module).__name__
    known = name in ROPE_KINDS and type(module) is getattr(pos_embed_sincos, name, None)
    return ROPE_KINDS[name] if known else None


def rope_problems(module: nn.Module, *, depth: int, num_heads: int, head_dim: int, rotate_half: bool) -> list[str]:
    """Why a timm rotary module cannot be described by `RotaryPositions` ([] when it can), for a tower of `depth`
    blocks whose attention has `num_heads` heads of `head_dim` and applies the rotations with `rotate_half`."""
    kind = rope_kind(module)
    if kind is None:
        return [f"its rotary position embedding is a {type(module).__name__}, a kind this package does not know "
                f"(known: timm's rope_type {', '.join(repr(k) for k in ROPE_KINDS.values())})"]
    if getattr(module, "dim", None) != (num_heads * head_dim if kind == "mixed" else head_dim):
        return [f"its rotary embedding ('{kind}') does not span the attention heads' width"]
    if head_dim % 4:
        return [f"its attention heads of {head_dim} channels cannot hold a 2-D rotary embedding (a multiple of 4)"]
    if getattr(module, "grid_indexing", None) not in ("ij", "xy"):
        return [f"its rotary embedding indexes the grid as {getattr(module, 'grid_indexing', None)!r}"]
    if kind == "cat" and module.grid_type != "index":
        return [f"its rotary embedding ('cat') places patches on a {module.grid_type!r} grid (the patch index "
                f"grid is supported)"]
    if kind == "dinov3" and module.normalize_coords not in _NORMALIZE_COORDS:
        return [f"its rotary embedding ('dinov3') normalises coordinates by {module.normalize_coords!r}"]
    if kind == "mixed" and (module.depth != depth or module.num_heads != num_heads or rotate_half):
        return ["its mixed rotary embedding does not have one set of frequencies per block and head, interleaved"]
    if kind != "mixed" and bool(module.rotate_half) != bool(rotate_half):
        return ["its attention applies the rotations in another layout than its rotary embedding computes them"]
    return []


def rotate_after_prefix(x: Tensor, rotations: Tensor, num_prefix: int, rotate_half: bool) -> Tensor:
    """Queries or keys [B, heads, N, head_dim] with every token after the first `num_prefix` rotated by `rotations`
    (timm's [sin | cos] layout, applied in halves with `rotate_half`), as timm's `AttentionRope` does."""
    from timm.layers import apply_rot_embed_cat

    rotated = apply_rot_embed_cat(x[:, :, num_prefix:], rotations, half=rotate_half)
    return torch.cat([x[:, :, :num_prefix], rotated], dim=2).type_as(x)


def spec_problem(spec) -> str | None:
    """Why `spec` is not a rotary spec `RotaryPositions.from_spec` can build (None when it is)."""
    from collections.abc import Mapping

    if not isinstance(spec, Mapping) or spec.get("kind") not in ROPE_SPEC_KEYS:
        kinds = ", ".join(repr(k) for k in ROPE_SPEC_KEYS)
        return f"a rotary spec is a mapping whose 'kind' is one of {kinds}, got {spec!r}"
    keys = ROPE_SPEC_KEYS[spec["kind"]]
    if set(spec) != set(keys):
        return (f"a '{spec['kind']}' rotary spec has exactly the keys {', '.join(keys)} "
                f"(unknown {sorted(set(spec) - set(keys))}, missing {sorted(set(keys) - set(spec))})")
    size = spec["grid_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        return f"a rotary spec's grid_size is [rows, cols] of positive integers, got {size!r}"
    if spec["grid_indexing"] not in ("ij", "xy"):
        return f"a rotary spec's grid_indexing is 'ij' or 'xy', got {spec['grid_indexing']!r}"
    if spec["kind"] == "dinov3" and spec["normalize_coords"] not in _NORMALIZE_COORDS:
        return f"a 'dinov3' rotary spec's normalize_coords is one of {', '.join(_NORMALIZE_COORDS)}"
    if spec["kind"] == "mixed" and spec["rotate_half"]:
        return "a 'mixed' rotary spec interleaves its rotations (rotate_half false)"
    return None


@dataclass(frozen=True, eq=False)
class RotaryPositions:
    """How a rotary teacher rotates the queries and keys of the tokens after its prefix (`Teacher.rope`).

    Positions are (row, col) on the teacher's patch grid in patches, the patch in row i and column j at (i, j)
    (`grid_positions`; `from_image` converts points in normalised image coordinates). `rotations(positions, block)`
    is what a timm Eva block takes as `rope=`: timm's concatenated [sin | cos] layout, applied by
    `timm.layers.apply_rot_embed_cat(x, rotations, half=rotate_half)` to each head's query and key after the
    prefix tokens (`rotate`), after qk-norm.

    Attributes:
        kind: timm's rope_type, 'cat' | 'mixed' | 'dinov3' (see the module docstring).
        grid_size: (rows, cols) of the patch grid.
        num_prefix_tokens: the unrotated tokens at the front (class token, registers).
        num_heads, head_dim: the attention's heads.
        rotate_half: timm's layout: halves ([f0, f1, .., f0, f1, ..]) rather than interleaved pairs.
        per_block: every block (and head) has its own rotations ('mixed'); else one set serves every block.
        module: timm's rotary module itself (shared with the teacher, not a copy).
    """

    kind: str
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    num_heads: int
    head_dim: int
    rotate_half: bool
    depth: int
    module: nn.Module

    @property
    def per_block(self) -> bool:
        return self.kind == "mixed"

    # --------------------------------------------------------------------------------- as plain data
    def spec(self) -> dict:
        """The rotary module as plain data (JSON-able; `ROPE_SPEC_KEYS`): the grid, the layout and timm's constructor
        arguments that the rotations depend on. `from_spec` rebuilds a module computing the same rotations."""
        m = self.module
        spec = {"kind": self.kind, "grid_size": list(self.grid_size), "rotate_half": bool(self.rotate_half),
                "grid_indexing": m.grid_indexing}
        if self.kind == "cat":
            spec.update(temperature=m.temperature, in_pixels=bool(m.in_pixels), max_res=m.max_res,
                        linear_bands=bool(m.linear_bands), grid_offset=m.grid_offset,
                        ref_feat_shape=None if m.ref_feat_shape is None else list(m.ref_feat_shape))
        elif self.kind == "dinov3":
            spec.update(temperature=m.temperature, min_period=m.min_period, max_period=m.max_period,
                        normalize_coords=m.normalize_coords, grid_offset=m.grid_offset)
        else:
            spec.update(temperature=m.temperature)
        return spec

    @classmethod
    def from_spec(cls, spec, *, num_heads: int, head_dim: int, num_prefix_tokens: int, depth: int,
                  device=None) -> "RotaryPositions":
        """A new timm rotary module built from `spec()`'s data, for `depth` blocks of `num_heads` heads of `head_dim`
        whose first `num_prefix_tokens` tokens stay unrotated. Its fixed frequencies are computed as the teacher's
        were (the same rotations, bit for bit); a 'mixed' module's learned frequencies are fresh: load them
        (`weights`)."""
        from timm.layers import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed

        problem = spec_problem(spec)
        if problem:
            raise ValueError(problem)
        kind, s = spec["kind"], dict(spec)
        common = dict(grid_indexing=s["grid_indexing"], feat_shape=None, device=device)
        if kind == "cat":
            module = RotaryEmbeddingCat(
                head_dim, max_res=s["max_res"], temperature=s["temperature"], in_pixels=s["in_pixels"],
                linear_bands=s["linear_bands"], grid_type="index", grid_offset=s["grid_offset"],
                rotate_half=s["rotate_half"],
                ref_feat_shape=None if s["ref_feat_shape"] is None else list(s["ref_feat_shape"]), **common)
        elif kind == "dinov3":
            module = RotaryEmbeddingDinoV3(
                head_dim, temperature=s["temperature"], min_period=s["min_period"], max_period=s["max_period"],
                normalize_coords=s["normalize_coords"], grid_offset=s["grid_offset"], rotate_half=s["rotate_half"],
                **common)
        else:
            module = RotaryEmbeddingMixed(num_heads * head_dim, depth=depth, num_heads=num_heads,
                                          temperature=s["temperature"], **common)
        return cls(kind=kind, grid_size=tuple(s["grid_size"]), num_prefix_tokens=num_prefix_tokens,
                   num_heads=num_heads, head_dim=head_dim, rotate_half=bool(s["rotate_half"]), depth=depth,
                   module=module)

    def weights(self, blocks: Sequence[int]) -> dict[str, Tensor]:
        """The rotary module's learned weights for these blocks, in the layout of a module that `from_spec` builds
        for `len(blocks)` blocks (its block j is block `blocks[j]` here): RoPE-Mixed's frequencies of those
        blocks; nothing for the fixed kinds. Detached copies."""
        if not self.per_block:
            return {}
        return {"freqs": self.module.freqs[:, list(blocks)].detach().clone()}

    # --------------------------------------------------------------------------------- positions
    def grid_positions(self, device: torch.device | str | None = None) -> Tensor:
        """The patch tokens' positions [rows * cols, 2] as (row, col), in token order (row-major)."""
        h, w = self.grid_size
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        return torch.stack([rows, cols], dim=-1).reshape(-1, 2).float()

    def from_image(self, points: Tensor) -> Tensor:
        """Grid positions [..., 2] (row, col) of points [..., 2] (x, y) in normalised image coordinates ([0, 1],
        as SparseFormer's RoIs): a patch's centre maps to its (row, col). Exact up to the rounding of `points`."""
        h, w = self.grid_size
        x, y = points.float().unbind(-1)
        return torch.stack([y * h - 0.5, x * w - 0.5], dim=-1)

    # --------------------------------------------------------------------------------- rotations
    def rotations(self, positions: Tensor, block: int = 0) -> Tensor:
        """The rotations of tokens at `positions` ([N, 2] or [B, N, 2], (row, col) on the grid) in block `block`:
        [N, 2 * head_dim] / [B, 1, N, 2 * head_dim], or for per-block ('mixed') rotations
        [num_heads, N, 2 * head_dim] / [B, num_heads, N, 2 * head_dim]; float32, on the module's device."""
        if not isinstance(positions, Tensor) or positions.ndim not in (2, 3) or positions.shape[-1] != 2:
            got = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"rotary positions are a tensor [N, 2] or [B, N, 2] of (row, col) on the "
                             f"{self.grid_size[0]}x{self.grid_size[1]} patch grid, got {got}")
        if isinstance(block, bool) or not isinstance(block, int) or not -self.depth <= block < self.depth:
            raise IndexError(f"block {block!r} is outside the teacher's {self.depth} blocks")
        rows, cols = positions.float().unbind(-1)
        rot = getattr(self, f"_{self.kind}")(rows, cols, block % self.depth)
        return rot.unsqueeze(1) if positions.ndim == 3 and not self.per_block else rot

    def rotate(self, x: Tensor, rotations: Tensor) -> Tensor:
        """Queries or keys [B, heads, N, head_dim] with the tokens after the prefix rotated, as timm's attention does."""
        return rotate_after_prefix(x, rotations, self.num_prefix_tokens, self.rotate_half)

    def _axes(self, rows: Tensor, cols: Tensor) -> tuple[list[Tensor], list[int]]:
        """The coordinates and grid sizes in the module's channel order (timm's `_build_grid`: 'xy' puts x first)."""
        (h, w), m = self.grid_size, self.module
        return ([rows, cols], [h, w]) if m.grid_indexing == "ij" else ([cols, rows], [w, h])

    def _layout(self, angles: Tensor) -> Tensor:
        """[.., D/2] angles -> timm's [sin | cos] rotations [.., 2 * D]: each frequency twice, as halves
        ([f0, f1, .., f0, f1, ..]) or interleaved ([f0, f0, f1, f1, ..]; timm's `_rope_layout`)."""
        def layout(v: Tensor) -> Tensor:
            return torch.cat([v, v], dim=-1) if self.rotate_half else v.repeat_interleave(2, -1)

        return torch.cat([layout(angles.sin()), layout(angles.cos())], dim=-1)

    def _cat(self, rows: Tensor, cols: Tensor, block: int) -> Tensor:
        # timm `_build_grid(grid_type='index')`: t = index + grid_offset, then t / feat * ref (EVA's resizing);
        # then `build_fourier_pos_embed`: grid * bands, one band set per axis, axes concatenated.
        m = self.module
        coords, sizes = self._axes(rows, cols)
        refs = None if m.ref_feat_shape is None else list(m.ref_feat_shape)
        if refs is not None and m.grid_indexing == "xy":
            refs = [refs[1], refs[0]] + refs[2:]
        scaled = []
        for i, t in enumerate(coords):
            t = t + m.grid_offset
            scaled.append(t if refs is None else t / sizes[i] * refs[i])
        grid = torch.stack(scaled, dim=-1).to(m.bands.device)
        return self._layout((grid[..., None] * m.bands).flatten(-2))

    def _dinov3(self, rows: Tensor, cols: Tensor, block: int) -> Tensor:
        # timm `_build_grid(grid_type='centered')`: (index + 0.5 + grid_offset) / size, mapped to [-1, 1]; then
        # `RotaryEmbeddingDinoV3._get_pos_embed_from_coords`: angles 2 pi x / periods.
        m = self.module
        coords, sizes = self._axes(rows, cols)
        denoms = {"separate": sizes, "min": [min(sizes)] * 2, "max": [max(sizes)] * 2}[m.normalize_coords]
        grid = torch.stack([(t + 0.5 + m.grid_offset) / float(d) for t, d in zip(coords, denoms)], dim=-1)
        grid = 2.0 * grid - 1.0
        grid = grid[..., None].to(device=m.periods.device, dtype=m.periods.dtype)
        return self._layout((2 * math.pi * grid / m.periods).flatten(-2))

    def _mixed(self, rows: Tensor, cols: Tensor, block: int) -> Tensor:
        # timm `get_mixed_freqs`: per block and head, angles t_x * freqs_x + t_y * freqs_y (t_x the first channel
        # of the index grid); computed in float32 and returned in the frequencies' dtype.
        m = self.module
        (t_x, t_y), _ = self._axes(rows, cols)
        freqs = m.freqs[:, block].float()  # [2, heads, head_dim // 2]
        t_x, t_y = t_x.to(freqs.device)[..., None, :, None], t_y.to(freqs.device)[..., None, :, None]
        angles = t_x * freqs[0][:, None, :] + t_y * freqs[1][:, None, :]  # [(B,) heads, N, head_dim // 2]
        return self._layout(angles).to(m.freqs.dtype)

    # --------------------------------------------------------------------------------- the grid, as timm has it
    def grid_rotations(self) -> Tensor:
        """timm's own rotations of the whole grid, as `Eva._pos_embed` computes them for the teacher's image size:
        [rows * cols, 2 * head_dim], or [depth, num_heads, rows * cols, 2 * head_dim] per block ('mixed')."""
        m = self.module
        if getattr(m, "feat_shape", None) is None:  # built for dynamic image sizes: computed for the shape asked
            return m.get_embed(shape=list(self.grid_size))
        return m.get_embed()

    def check(self) -> str | None:
        """Why `rotations` at the grid positions would not be timm's own grid rotations (None when they are, to
        float32 rounding): the guard against a rotary variant or option that this description does not follow.
        Skipped (None) for a module on the meta device, which holds no values."""
        own = self.grid_rotations()
        if own.is_meta:
            return None
        pos = self.grid_positions()
        ours = torch.stack([self.rotations(pos, i) for i in range(self.depth)]) if self.per_block else \
            self.rotations(pos)
        if ours.shape != own.shape or not torch.allclose(ours.to(own), own, rtol=0, atol=1e-5):
            return (f"its rotary embedding ('{self.kind}', {type(self.module).__name__}) computes rotations this "
                    f"package does not reproduce (an option or variant it does not know)")
        return None
