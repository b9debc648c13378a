"""The teacher at a smaller token budget, untrained (eval.baselines.budget): a lower resolution, a larger patch and
random patch dropping, on tiny random teachers of every kind (open_clip ViTs, timm ViTs with a class token or none,
registers, MAP heads, and timm Eva towers with rotary positions)."""

from __future__ import annotations

import copy
import functools
import warnings
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F

import tiny_towers
from eval.baselines.budget import BASELINES, BudgetError, LargerPatch, LowResolution, RandomDrop, budget_baselines
from teachers import create_teacher
from teachers.budget import budget_grid, patch_for, resolution_for, rotary_grid_positions
from test_eval import TINY_CLIP

TIMM_TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
SPECS = {
    "openclip": {"kind": "openclip", "model": "tiny-budget-clip", "model_cfg": TINY_CLIP, "pretrained": None},
    "timm_token": {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                   "model_kwargs": {**TIMM_TINY, "num_classes": 5}},
    "dinov2_reg4": {"kind": "timm", "model": "vit_small_patch14_reg4_dinov2", "pretrained": None, "image_size": 28,
                    "model_kwargs": {"patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2}},
    **{f"timm:{k}": v for k, v in tiny_towers.TIMM_SPECS.items() if k in ("tiny_siglip_map", "tiny_siglip_gap")},
    **{f"eva:{k}": v for k, v in tiny_towers.EVA_SPECS.items()},
    # open_clip models on timm towers: SigLIP's (no class token, MAP head, logit bias) and PE-Core's (rotary)
    "openclip:siglip": tiny_towers.openclip_spec("tiny_siglip_map"),
    "openclip:pe_core": tiny_towers.openclip_spec("tiny_pe_core", proj=None, logit_bias=None),
}


@functools.lru_cache(maxsize=None)
def _teacher(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = create_teacher(copy.deepcopy(SPECS[name]))
    with torch.no_grad():  # no weight at a trivial value (ones, zeros) that would hide one read wrongly
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher


def _images(teacher, n=2):
    return torch.randn(n, 3, *teacher.preprocess.size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_at_the_full_budget_each_baseline_is_the_teacher(name):
    teacher = _teacher(name)
    x = _images(teacher)
    want = teacher.embed(x)
    for method, cls in BASELINES.items():
        model = cls(teacher, teacher.num_patches)
        assert model.num_tokens == teacher.num_prefix_tokens + teacher.num_patches
        torch.testing.assert_close(model.embed(x), want, rtol=0, atol=1e-6, msg=method)
        pre, out = model.forward_outputs(x)
        torch.testing.assert_close(out, model(x))
        assert not any(p.requires_grad for p in model.parameters()) and not model.train().training


def _timm_at(teacher, **overrides):
    """A timm model of the teacher's architecture built with ``overrides``, holding the teacher's weights as timm's
    own checkpoint loading adapts them (`checkpoint_filter_fn`: position and patch embeddings resampled)."""
    from timm.models import eva, vision_transformer

    spec = teacher.spec
    size = {"img_size": spec["image_size"]} if spec.get("image_size") else {}
    model = timm.create_model(spec["model"], **{**(spec.get("model_kwargs") or {}), **size, **overrides})
    module = eva if type(model).__name__ == "Eva" else vision_transformer
    model.load_state_dict(module.checkpoint_filter_fn(teacher.vit.state_dict(), model))
    return model.eval()


@pytest.mark.parametrize("name", [n for n in sorted(SPECS) if not n.startswith("openclip")])
def test_a_lower_resolution_is_timms_own_dynamic_size_computation(name):
    """The position embedding interpolated as timm's `resample_abs_pos_embed` does it in a ViT built with
    dynamic_img_size, and a rotary teacher's positions those timm's rotary module gives the smaller grid."""
    teacher = _teacher(name)
    x = _images(teacher)
    tokens = teacher.num_patches // 4
    model = LowResolution(teacher, tokens)
    assert model.num_patches <= tokens and model.size[0] < teacher.preprocess.size[0]
    timm_model = _timm_at(teacher, dynamic_img_size=True)
    small = F.interpolate(x, size=model.size, mode=teacher.preprocess.interpolation, antialias=True)
    with torch.no_grad():
        want = timm_model.forward_head(timm_model.forward_features(small), pre_logits=True)
    torch.testing.assert_close(model(x, pre_logits=True), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["timm_token", "timm:tiny_siglip_map", "dinov2_reg4"])
def test_a_larger_patch_is_timms_own_resampled_patch_embedding(name):
    """The patch embedding resampled by `resample_patch_embed` (FlexiViT) as timm resamples a checkpoint for a model
    of a larger patch, the position embedding to the new grid."""
    teacher = _teacher(name)
    x = _images(teacher)
    patch = 2 * teacher.patch_size[0]
    model = LargerPatch(teacher, patch=patch)
    assert model.num_patches == teacher.num_patches // 4
    timm_model = _timm_at(teacher, patch_size=patch)
    with torch.no_grad():
        want = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(model(x, pre_logits=True), want, rtol=0, atol=1e-5)


def test_an_open_clip_tower_at_a_lower_resolution_uses_timms_interpolation():
    """open_clip's own tower, its positional embedding replaced by timm's `resample_abs_pos_embed` of it."""
    from timm.layers import resample_abs_pos_embed

    teacher = _teacher("openclip")
    x = _images(teacher)
    model = LowResolution(teacher, size=16)
    visual = copy.deepcopy(teacher.model.visual)
    with torch.no_grad():
        visual.positional_embedding.data = resample_abs_pos_embed(
            visual.positional_embedding[None], new_size=[2, 2], old_size=[4, 4], num_prefix_tokens=1)[0]
        visual.grid_size = (2, 2)
        want = visual(F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True))
    torch.testing.assert_close(model.embed(x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["eva:tiny_pe_core", "eva:tiny_dinov3", "eva:tiny_rope_mixed", "eva:tiny_eva02_clip"])
def test_rotary_positions_on_a_smaller_grid_are_timms(name):
    """The rotations at `rotary_grid_positions` are those timm's rotary module computes for the smaller grid."""
    teacher = _teacher(name)
    rope = teacher.rope
    module = copy.deepcopy(rope.module)
    grid = (2, 3)
    if rope.kind == "cat":  # built for a fixed grid: the embedding timm builds from its bands for another shape
        want = module._build_embed_cat(list(grid), module.bands) if hasattr(module, "_build_embed_cat") else None
        if want is None:
            pytest.skip("this timm's RotaryEmbeddingCat builds no embedding for another shape")
    else:
        want = module.get_embed(shape=list(grid))
    positions = rotary_grid_positions(rope, grid)
    ours = torch.stack([rope.rotations(positions, i) for i in range(rope.depth)]) if rope.per_block else \
        rope.rotations(positions)
    torch.testing.assert_close(ours, want.to(ours), rtol=0, atol=1e-5)
    torch.testing.assert_close(rotary_grid_positions(rope, rope.grid_size), rope.grid_positions())


@pytest.mark.parametrize("name", ["openclip", "dinov2_reg4", "timm:tiny_siglip_gap", "eva:tiny_dinov3"])
def test_random_dropping_keeps_exactly_the_budget_and_every_prefix_token(name):
    teacher = _teacher(name)
    x = _images(teacher, 3)
    p, n = teacher.num_prefix_tokens, 5
    model = RandomDrop(teacher, n, seed=3)
    full = teacher.embed_tokens(x)
    tokens, positions = model._tokens(x)
    assert tokens.shape == (3, p + n, teacher.width) and model.forward_features(x).shape == tokens.shape
    assert torch.equal(tokens[:, :p], full[:, :p])  # the class token and registers, all kept
    keep = model.keep_indices(3)
    assert keep.shape == (3, n) and all(len(set(k.tolist())) == n for k in keep)
    assert all(bool((k[1:] > k[:-1]).all()) for k in keep)  # in grid order
    assert torch.equal(tokens[:, p:], torch.stack([full[i, p:][keep[i]] for i in range(3)]))
    assert not torch.equal(keep[0], keep[1])  # each image its own draw ...
    assert torch.equal(model.keep_indices(3), keep) and torch.equal(model.embed(x), model.embed(x))  # ... seeded
    assert not torch.equal(RandomDrop(teacher, n, seed=4).keep_indices(3), keep)
    if teacher.rope is not None:
        assert torch.equal(positions, teacher.rope.grid_positions()[keep])
        # The kept tokens carry their own positions: dropping none of them in a different order changes nothing.
        torch.testing.assert_close(RandomDrop(teacher, teacher.num_patches).embed(x), teacher.embed(x), rtol=0,
                                   atol=1e-6)


def test_budgets_give_grids_of_the_teachers_aspect():
    assert budget_grid((14, 14), 48) == budget_grid((14, 14), 49) == budget_grid((14, 14), 56) == (7, 7)
    assert budget_grid((14, 14), 57) == (8, 8) and budget_grid((14, 14), 1) == (1, 1)
    assert budget_grid((16, 16), 64) == (8, 8) and budget_grid((8, 8), 16) == (4, 4)
    assert budget_grid((4, 6), 6) == (2, 3) and budget_grid((4, 6), 24) == (4, 6)
    teacher = _teacher("timm_token")  # 32 px, 8 px patches: 4 x 4
    models = budget_baselines(teacher, [4, 5, 16])  # 5: the nearest grid is still 2 x 2; random keeps 5
    assert [m.name for m in models] == ["teacher at 16px", "teacher patch 16", "teacher random 4", "teacher random 5",
                                        "teacher at 32px", "teacher patch 8", "teacher random 16"]
    assert [m.num_patches for m in models] == [4, 4, 4, 5, 16, 16, 16]
    vit_b = SimpleNamespace(kind="timm", name="vit_b", patch_size=(16, 16), grid_size=(14, 14), num_patches=196,
                            preprocess=SimpleNamespace(size=(224, 224)))
    assert [patch_for(vit_b, n) for n in (48, 49, 64, 16, 196)] == [32, 32, 28, 56, 16]
    assert [resolution_for(vit_b, n) for n in (48, 64)] == [(112, 112), (128, 128)]


def test_bad_budgets_sizes_and_patches_name_the_largest_valid_value():
    teacher = _teacher("timm_token")  # 32 x 32 px, 8 px patches, 16 patch tokens
    cases = [
        (lambda: RandomDrop(teacher, 17), "token budget 17 is larger than the 16 patch tokens of teacher "
                                          "timm:vit_tiny_patch16_224; the largest valid budget is 16"),
        (lambda: LowResolution(teacher, 0), "the largest valid budget for teacher timm:vit_tiny_patch16_224 is 16"),
        (lambda: LowResolution(teacher, size=20), "input height 20 for teacher timm:vit_tiny_patch16_224 is no "
                                                  "multiple of its 8-px patch; the largest valid height up to 20 is 16"),
        (lambda: LowResolution(teacher, size=40), "is larger than its 32-px input; the largest valid height is 32"),
        (lambda: LargerPatch(teacher, patch=12), "the largest valid patch up to 12 is 8"),
        (lambda: LargerPatch(teacher, patch=4), "the smallest valid patch is the teacher's own, 8"),
        (lambda: budget_baselines(teacher, [4], methods=["merge"]), "the baselines are resolution, patch, random"),
    ]
    for make, message in cases:
        with pytest.raises(BudgetError) as info:
            make()
        assert message in str(info.value) and "\n" not in str(info.value)
