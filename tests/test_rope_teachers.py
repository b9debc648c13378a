"""Teachers with rotary position embeddings (issue 28): timm `Eva` towers (PE-Core, EVA-02 CLIP, DINOv3, RoPE-Mixed,
and a rope-less EVA) as kind timm and as open_clip image towers; `Teacher.rope`, the rotation of any position on the
patch grid; the real architectures read on the meta device; and what still refuses them. Students of these
teachers: `test_rope_students`.

Tiny random towers of each kind are in `tiny_towers` (`EVA_TOWERS`: 32 x 48 px, a 4 x 6 patch grid).
"""

from __future__ import annotations

import functools
import math
import warnings
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import tiny_towers
from teachers import SUPPORTED_TEACHERS, RandomTeacherWarning, UnsupportedTeacherError, create_teacher

SPECS = {**{f"timm:{k}": v for k, v in tiny_towers.EVA_SPECS.items()},
         "openclip:pe_core": tiny_towers.openclip_spec("tiny_pe_core", proj=None, logit_bias=None),
         "openclip:eva02_clip": tiny_towers.openclip_spec("tiny_eva02_clip", proj=None, logit_bias=-10.0)}
ROTARY = sorted(k for k in SPECS if not k.endswith("plain"))


@functools.lru_cache(maxsize=None)  # built once per module: no test changes a teacher
def _teacher(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomTeacherWarning; timm's note on the tiny towers' missing configs
        teacher = create_teacher(SPECS[name])
    # Fresh norms, biases, LayerScale gammas, MAP latents and mixed RoPE frequencies are ones/zeros/constants:
    # move every image-tower weight so that a weight not read (or read in the wrong place) shows.
    with torch.no_grad():
        for p in teacher.vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher


def _images(n=2):
    return torch.randn(n, 3, *tiny_towers.EVA_IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- the architecture
EXPECTED = {  # rope kind, prefix tokens, pool, mlp, act, qk-norm, attn norm, mlp norm, LayerScale, norm before pool
    "timm:tiny_pe_core": ("cat", 1, "map", "mlp", "gelu", False, False, False, False, True),
    "timm:tiny_eva02_clip": ("cat", 1, "token", "swiglu", "silu", False, True, True, False, True),
    "timm:tiny_dinov3": ("dinov3", 5, "avg", "glu_gate_first", "silu", False, False, False, True, True),
    "timm:tiny_rope_mixed": ("mixed", 1, "avg", "mlp", "gelu", True, False, False, True, False),
    "timm:tiny_eva_plain": (None, 1, "token", "mlp", "gelu", False, False, False, False, True),
    "openclip:pe_core": ("cat", 1, "map", "mlp", "gelu", False, False, False, False, True),
    "openclip:eva02_clip": ("cat", 1, "token", "swiglu", "silu", False, True, True, False, True),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_eva_teachers_read_their_architecture(name):
    t = _teacher(name)
    assert (t.rope and t.rope.kind, t.num_prefix_tokens, t.pool, t.mlp_layer, t.mlp_act, t.qk_norm, t.attn_norm,
            t.mlp_norm, t.layer_scale, t.norm_before_pool) == EXPECTED[name]
    assert (t.grid_size, t.num_patches, t.width, t.num_heads) == ((4, 6), 24, 48, 2)
    if t.rope is not None:
        assert (t.rope.grid_size, t.rope.num_prefix_tokens, t.rope.head_dim) == ((4, 6), t.num_prefix_tokens, 24)
        assert t.rope.rotate_half == (t.rope.kind == "dinov3") and t.rope.module is t.vit.rope
    stem = t.stem_state_dict()
    assert ("pos_embed" in stem) == (t.vit.pos_embed is not None) and ("norm_pre.weight" in stem) == name.endswith(
        "pe_core")
    if name.startswith("openclip"):
        assert type(t).__name__ == "OpenClipEvaTeacher" and t.family == "clip" and t.embed_dim == 40
        assert t.head_state_dict()["weight"].shape == (40, 48)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_pass_targets_equal_timms_own_computation(name):
    """embedding = embed (timm's / open_clip's forward), tokens = timm's forward_features (final norm), attention =
    each block's probabilities as timm's unfused attention computes them, with the rotations applied to q and k."""
    t = _teacher(name)
    x = _images()
    got = t.targets(x, ["embedding", "tokens", "attention"])
    torch.testing.assert_close(got["embedding"], t.embed(x), rtol=0, atol=1e-6)
    if name.startswith("openclip"):
        torch.testing.assert_close(got["embedding"], t.model.encode_image(x), rtol=0, atol=1e-6)
    tokens, probs = tiny_towers.timm_forward_with_attention(t.vit, x)
    final = tokens if t.norm_before_pool else t._final_norm()(tokens)
    torch.testing.assert_close(got["tokens"], final, rtol=0, atol=1e-5)
    assert len(got["attention"]) == t.depth == len(probs)
    for ours, timms in zip(got["attention"], probs):
        torch.testing.assert_close(ours, timms, rtol=0, atol=1e-6)
    # forward_tokens runs the blocks with the grid's rotations too.
    torch.testing.assert_close(t.forward_tokens(x), got["tokens"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- rotary positions
def _rotations_timm_passes(t, x):
    """The `rope=` timm's own forward hands each block."""
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["rope"]), with_kwargs=True)
             for blk in t.vit.blocks]
    try:
        with torch.no_grad():
            t.vit.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ROTARY)
def test_the_rotations_of_the_patch_grid_are_exactly_what_the_teacher_uses(name):
    t = _teacher(name)
    rope = t.rope
    grid = rope.grid_positions()
    assert grid.shape == (24, 2) and grid[7].tolist() == [1.0, 1.0]  # row-major: token 7 is row 1, column 1
    for i, theirs in enumerate(_rotations_timm_passes(t, _images())):
        ours = rope.rotations(grid, i)
        assert torch.equal(ours, theirs), (name, i)  # bit for bit
        assert torch.equal(rope.rotations(grid[None].expand(3, -1, -1), i)[1], ours if rope.per_block else ours[None])
    assert rope.check() is None


@pytest.mark.parametrize("name", ROTARY)
def test_a_token_on_a_patch_centre_gets_that_patch_rotation(name):
    """A latent token whose RoI is exactly one patch (centre in normalised image coordinates) gets that patch's
    rotation; positions between patches interpolate the angles (each kind is linear in the position)."""
    t = _teacher(name)
    rope = t.rope
    h, w = rope.grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) / w, (rows.flatten() + 0.5) / h], dim=-1)  # (x, y) of each patch
    torch.testing.assert_close(rope.from_image(centres), rope.grid_positions(), rtol=0, atol=1e-5)
    torch.testing.assert_close(rope.rotations(rope.from_image(centres)), rope.rotations(rope.grid_positions()),
                               rtol=0, atol=1e-5)
    # Halfway between two points the angles are halfway (each kind is linear in the position): as unit complex
    # numbers cos + i sin, the midpoint's squared is the product of the ends'.
    ends = torch.tensor([[0.0, 0.0], [1.3, 2.0], [2.6, 4.0], [3.0, 0.0], [1.5, 2.5], [0.0, 5.0]])
    z = torch.view_as_complex(rope.rotations(ends).unflatten(-1, (2, -1)).flip(-2).transpose(-2, -1).contiguous())
    start, mid, end = z[..., 0::3, :], z[..., 1::3, :], z[..., 2::3, :]
    torch.testing.assert_close(mid * mid, start * end, rtol=0, atol=1e-5)


def _rebuilt_block(t, i):
    """Block i rebuilt as a student would: timm's AttentionRope and MLP over `block_state_dict` (strict), the
    rotations given as `rope=`."""
    from timm.layers import AttentionRope

    from students.blocks import mlp

    norm = partial(nn.LayerNorm, eps=t.norm_eps)
    blk = nn.Module()
    blk.norm1, blk.norm2 = norm(t.width), norm(t.width)
    blk.attn = AttentionRope(t.width, t.num_heads, qkv_bias=True, qk_norm=t.qk_norm, scale_norm=t.attn_norm,
                             norm_layer=norm, rotate_half=t.rope.rotate_half, num_prefix_tokens=t.num_prefix_tokens)
    blk.mlp = mlp(t.mlp_layer, t.width, t.mlp_hidden_dim, t.mlp_act)
    if t.mlp_norm:
        blk.mlp.norm = norm(blk.mlp.fc2.in_features)
    blk.load_state_dict(t.block_state_dict(i), strict=True)

    def forward(x, rope):
        x = x + blk.attn(blk.norm1(x), rope=rope)
        return x + blk.mlp(blk.norm2(x))
    return forward


@pytest.mark.parametrize("name", ROTARY)
def test_a_block_rebuilt_from_the_interface_is_the_teachers_block_at_any_positions(name):
    """What a student inheriting a rotary block needs: the block's weights (timm `Block` layout, LayerScale folded,
    EVA's separate q/k/v fused) and `rope.rotations` at its tokens' positions reproduce the teacher's own block, on the
    patch grid and at fractional positions (latent tokens elsewhere on the grid, fewer of them)."""
    t = _teacher(name)
    torch.manual_seed(5)
    x = torch.randn(2, t.num_prefix_tokens + t.num_patches, t.width)
    grid = t.rope.grid_positions()
    anywhere = torch.rand(2, 7, 2) * torch.tensor([3.0, 5.0])  # 7 latent tokens per image at (row, col) in the grid
    latents = torch.randn(2, t.num_prefix_tokens + 7, t.width)
    with torch.no_grad():
        for i in range(t.depth):
            block = _rebuilt_block(t, i)
            torch.testing.assert_close(block(x, t.rope.rotations(grid, i)), t.run_block(i, x), rtol=0, atol=1e-5)
            torch.testing.assert_close(t.run_block(i, x, positions=grid), t.run_block(i, x), rtol=0, atol=0)
            torch.testing.assert_close(block(latents, t.rope.rotations(anywhere, i)),
                                       t.run_block(i, latents, positions=anywhere), rtol=0, atol=1e-5)
    # The queries and keys of `block_modules` are rotated at the same positions.
    parts = t.block_modules(0, positions=anywhere)
    assert torch.equal(parts.rotations, t.rope.rotations(anywhere, 0))
    with pytest.raises(ValueError, match="patch grid.*pass positions="):
        t.run_block(0, latents)
    with pytest.raises(ValueError, match=r"\[N, 2\] or \[B, N, 2\]"):
        t.run_block(0, latents, positions=anywhere[..., :1])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_head_rebuilt_from_the_interface_is_the_teachers(name):
    """Final norm (norm or fc_norm), pooling (class token, mean without the prefix, PE-Core's MAP head) and the
    projection, copied out of the teacher, give its own `pool_norm_head`."""
    from students.blocks import map_pool, pool_and_norm

    t = _teacher(name)
    tokens = torch.randn(3, t.num_prefix_tokens + t.num_patches, t.width, generator=torch.Generator().manual_seed(6))
    norm = nn.LayerNorm(t.width, eps=t.norm_eps)
    norm.load_state_dict(t.norm_state_dict())
    pool = None
    if t.pool == "map":
        pool = map_pool(t.width, t.pool_spec)
        pool.load_state_dict(t.pool_state_dict())
    head = t.head_state_dict()
    with torch.no_grad():
        prefix = 0 if t.pool_include_prefix else t.num_prefix_tokens  # PE-Core's MAP head reads the class token too
        ours = pool_and_norm(tokens, t.pool, prefix, norm, t.norm_before_pool, pool)
        if head is not None:
            ours = F.linear(ours, head["weight"], head.get("bias"))
        torch.testing.assert_close(ours, t.pool_norm_head(tokens), rtol=0, atol=1e-5)


def test_a_rotary_teacher_reloads_from_its_saved_weights(tmp_path):
    """A run saves a random teacher's weights for its recipe to name (`pretrained: file`): RoPE-Mixed's learned
    frequencies are weights too, and come back."""
    from safetensors.torch import save_file

    t = _teacher("timm:tiny_rope_mixed")
    save_file({k: v.contiguous() for k, v in t.model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    again = create_teacher({**SPECS["timm:tiny_rope_mixed"], "pretrained": str(tmp_path / "t.safetensors")})
    assert torch.equal(again.vit.rope.freqs, t.vit.rope.freqs)
    x = _images()
    torch.testing.assert_close(again.embed(x), t.embed(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- open_clip: zero-shot
@pytest.mark.parametrize("name,bias", [("openclip:pe_core", None), ("openclip:eva02_clip", -10.0)])
def test_an_openclip_eva_teacher_gives_its_models_zero_shot_logits(name, bias):
    """PE-Core-like (softmax logits, no bias) and with a logit bias (sigmoid logits): the teacher's embedding,
    text tower, logit_scale and logit_bias give open_clip's own `get_logits`."""
    t = _teacher(name)
    assert t.logit_scale == pytest.approx(float(t.model.logit_scale.exp())) and t.logit_bias == bias
    x = _images(3)
    texts = t.tokenizer(["a photo of a cat.", "a photo of a dog."])
    with torch.no_grad():
        ours = t.logit_scale * F.normalize(t.embed(x), dim=-1) @ F.normalize(t.encode_text(texts), dim=-1).t()
        theirs = t.model.get_logits(x, texts)[0]
    torch.testing.assert_close(ours + (bias or 0.0), theirs, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- the real architectures, on meta
REAL_TIMM = {  # rope kind, grid, prefix, rotate_half, pool, mlp, attn norm, mlp norm, LayerScale, head width
    "vit_pe_core_base_patch16_224": ("cat", (14, 14), 1, False, "map", "mlp", False, False, False, 1024),
    "vit_pe_core_large_patch14_336": ("cat", (24, 24), 1, False, "map", "mlp", False, False, False, 1024),
    "eva02_large_patch14_clip_224": ("cat", (16, 16), 1, False, "token", "swiglu", True, True, False, 768),
    "vit_base_patch16_dinov3": ("dinov3", (16, 16), 5, True, "avg", "mlp", False, False, True, 0),  # 256 px
}


def _materialize_rope(t):
    """The rotary module's buffers computed on the CPU (everything else stays on meta)."""
    t.vit.rope.to_empty(device="cpu")
    t.vit.rope.init_non_persistent_buffers()


def _check_meta_block_layout(t):
    """The block weights' keys and shapes load strictly into timm's `Block` of the teacher's description."""
    from timm.layers import GluMlp, Mlp, SwiGLU
    from timm.models.vision_transformer import Block

    layer = {"mlp": Mlp, "swiglu": SwiGLU, "glu_gate_first": partial(GluMlp, gate_last=False)}[t.mlp_layer]
    with torch.device("meta"):
        blk = Block(t.width, t.num_heads, mlp_ratio=t.mlp_ratio, qkv_bias=True, qk_norm=t.qk_norm,
                    scale_attn_norm=t.attn_norm, scale_mlp_norm=t.mlp_norm, mlp_layer=layer)
    blk.load_state_dict(t.block_state_dict(-1), strict=True)


@pytest.mark.parametrize("model", sorted(REAL_TIMM))
def test_real_timm_eva_towers_read_on_the_meta_device(model):
    from teachers.timm_vit import TimmEvaTeacher, structure_problems

    vit = timm.create_model(model, device="meta")
    assert structure_problems(vit) == []
    t = TimmEvaTeacher(vit, name=model, spec={"kind": "timm", "model": model, "pretrained": None})
    kind, grid, prefix, half, pool, mlp, attn_norm, mlp_norm, layer_scale, head = REAL_TIMM[model]
    assert (t.rope.kind, t.rope.grid_size, t.rope.num_prefix_tokens, t.rope.rotate_half) == (kind, grid, prefix, half)
    assert (t.pool, t.mlp_layer, t.attn_norm, t.mlp_norm, t.layer_scale, t.num_classes) == \
        (pool, mlp, attn_norm, mlp_norm, layer_scale, head)
    _check_meta_block_layout(t)
    _materialize_rope(t)  # the real rotary settings, computed: the accessor gives timm's grid exactly
    assert torch.equal(t.rope.rotations(t.rope.grid_positions()), t.rope.grid_rotations())


REAL_OPENCLIP = {  # timm tower, embed_dim, grid, pool, logit bias
    "PE-Core-L-14-336": ("vit_pe_core_large_patch14_336", 1024, (24, 24), "map"),
    "EVA02-L-14": ("eva02_large_patch14_clip_224", 768, (16, 16), "token"),
}


@pytest.mark.parametrize("model", sorted(REAL_OPENCLIP))
def test_real_openclip_eva_models_read_on_the_meta_device(model):
    import open_clip

    from teachers.openclip import OpenClipEvaTeacher, config_problems

    cfg = open_clip.get_model_config(model)
    assert config_problems(cfg) == []
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(model, pretrained=None, device="meta")
    clip.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # a value to read (meta holds none)
    t = OpenClipEvaTeacher(clip, name=model, spec={"kind": "openclip", "model": model, "pretrained": None},
                           tokenizer_name=model, model_cfg=cfg)
    tower, embed_dim, grid, pool = REAL_OPENCLIP[model]
    assert cfg["vision_cfg"]["timm_model_name"] == tower
    assert (t.embed_dim, t.rope.kind, t.rope.grid_size, t.pool, t.logit_bias) == (embed_dim, "cat", grid, pool, None)
    assert t.head_state_dict()["weight"].shape == (embed_dim, t.width)
    assert t.logit_scale == pytest.approx(1 / 0.07)
    _check_meta_block_layout(t)
    _materialize_rope(t)
    assert torch.equal(t.rope.rotations(t.rope.grid_positions()), t.rope.grid_rotations())


# ----------------------------------------------------------------------------- what is supported, what refuses
# Besides the real architectures above (each family the message names, once; building costs ~0.5 s each).
SUPPORTED_EVA_TIMM = ["eva02_base_patch14_224", "vit_large_patch16_dinov3", "vit_base_patch16_rope_mixed_224",
                      "vit_base_patch16_rope_reg1_gap_256"]
SUPPORTED_EVA_OPENCLIP = ["PE-Core-B-16", "EVA02-B-16", "EVA01-g-14"]
UNSUPPORTED_EVA = {"vit_base_patch16_sapiens2": "RmsNorm", "vit_pe_spatial_base_patch16_512": "final LayerNorm"}


def test_the_eva_teachers_named_in_the_message_are_what_it_says():
    import open_clip

    from teachers.openclip import config_problems
    from teachers.timm_vit import structure_problems

    for name in SUPPORTED_EVA_TIMM:
        assert structure_problems(timm.create_model(name, device="meta")) == [], name
    for name in SUPPORTED_EVA_OPENCLIP:
        assert config_problems(open_clip.get_model_config(name)) == [], name
        assert name in SUPPORTED_TEACHERS or name.startswith("PE-Core")
    assert "PE-Core-T/S/B/L/bigG" in SUPPORTED_TEACHERS
    for name, why in UNSUPPORTED_EVA.items():
        problems = structure_problems(timm.create_model(name, device="meta"))
        assert problems and why in " ".join(problems), (name, problems)
    assert "post-norm" in " ".join(config_problems(open_clip.get_model_config("EVA02-E-14")))
    gqa = _built(attn_type="rope", qkv_fused=False, num_kv_heads=1)
    assert structure_problems(gqa) == ["block 0 has grouped-query attention (fewer key/value heads than query heads)"]
    gated = _built()
    gated.blocks[1].attn.gate = nn.Linear(48, 48)
    assert structure_problems(gated) == ["block 1 has gated attention"]
    for words in ("PE-Core", "EVA-02", "DINOv3", "'cat', 'mixed' and 'dinov3'", "EVA02-E-14", "Sapiens2", "MRoPE"):
        assert words in SUPPORTED_TEACHERS, words


def _built(**eva_kwargs):
    from timm.models.eva import Eva

    torch.manual_seed(0)
    return Eva(img_size=(32, 48), patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0,
               use_rot_pos_emb=True, **eva_kwargs)


def test_a_rotary_embedding_this_package_does_not_know_is_refused_not_misread():
    """A rotary module of another class (a variant timm may add, here a subclass and timm's MRoPE), or a known
    class computing something its description does not (an option set that the description would misread)."""
    from timm.layers import RotaryEmbeddingCat

    from teachers.timm_vit import TimmEvaTeacher

    class NewRope(RotaryEmbeddingCat):
        pass

    spec = {"kind": "timm", "model": "x", "pretrained": None}
    model = _built()
    model.rope.__class__ = NewRope
    with pytest.raises(UnsupportedTeacherError, match="NewRope, a kind this package does not know"):
        TimmEvaTeacher(model, name="x", spec=spec)
    with pytest.raises(UnsupportedTeacherError, match="RotaryEmbeddingMRope, a kind this package does not know"):
        TimmEvaTeacher(_built(rope_type="mrope"), name="x", spec=spec)
    model = _built()
    model.rope.grid_offset = 0.5  # its cached rotations still use 0: the guard compares them with ours
    with pytest.raises(UnsupportedTeacherError, match="computes rotations this package does not reproduce"):
        TimmEvaTeacher(model, name="x", spec=spec)


@pytest.mark.parametrize("name", ["timm:tiny_pe_core", "timm:tiny_eva02_clip"])
def test_tome_refuses_rotary_blocks_in_one_line(name):
    """Students inherit rotary blocks (`test_rope_students`); ToMe cannot: a merged token has no one position."""
    from eval.baselines.tome import ToMe, ToMeError

    with pytest.raises(ToMeError, match="merged tokens have no single position") as err:
        ToMe(_teacher(name), r=2)
    assert "\n" not in str(err.value)


def test_teacher_extras_leave_out_what_the_caller_reproduces():
    from teachers.base import TEACHER_EXTRAS, teacher_extras

    t = _teacher("timm:tiny_eva02_clip")
    assert t.extras() == ["rotary position embeddings ('cat')", "a LayerNorm on the attention output",
                          "a LayerNorm inside the MLP"]
    assert teacher_extras(t, handled=("rope", "mlp_norm")) == ["a LayerNorm on the attention output"]
    assert teacher_extras(_teacher("timm:tiny_pe_core"), handled=TEACHER_EXTRAS) == []
    with pytest.raises(ValueError, match="unknown teacher extras"):
        teacher_extras(t, handled=("rotary",))


def test_students_inherit_an_eva_without_rotary_positions_exactly():
    """EVA-01 style (absolute positions, plain blocks): SparseFormer's inherited blocks are the teacher's, and a
    Sparsifiner at keep rate 1 is the teacher."""
    from students.sparseformer.construct import bootstrap_student, inherited_units
    from students import sparsify

    t = _teacher("timm:tiny_eva_plain")
    assert t.extras() == []
    student, _ = bootstrap_student(t)
    tokens = torch.randn(2, 1 + 7, t.width, generator=torch.Generator().manual_seed(7))
    drop = t.depth // 3
    with torch.no_grad():
        for j, unit in enumerate(inherited_units(student)):
            torch.testing.assert_close(unit(tokens, None, None)[0], t.run_block(drop + j, tokens), rtol=0, atol=1e-5)
    sparse, _ = sparsify(t, keep_rate=1.0, basis_coef_topk=2)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(x, pre_logits=True), t.embed(x), rtol=0, atol=1e-5)
