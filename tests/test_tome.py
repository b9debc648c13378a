"""Token Merging (eval.baselines.tome) on tiny random teachers of both libraries."""

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from eval.baselines.tome import (
    ToMe,
    ToMeError,
    bipartite_soft_matching,
    fraction_schedule,
    max_r,
    merge_weighted,
    plan,
    schedule,
    tome_block,
)
from eval.cost import count_flops
from teachers import create_teacher

from conftest import FIXTURES
from tiny_towers import TIMM_SPECS, openclip_spec

TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 64, "num_heads": 2}  # 16 patches
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SPECS = {
    "timm_head": {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                  "model_kwargs": {**TIMM_KWARGS, "num_classes": 10}},
    # LayerScale and 4 registers: 5 prefix tokens that must never merge.
    "timm_reg_ls": {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                    "model_kwargs": {**TIMM_KWARGS, "num_classes": 0, "reg_tokens": 4, "init_values": 0.5}},
    "openclip": {"kind": "openclip", "model": "tiny-tome-clip", "model_cfg": TINY_CLIP, "pretrained": None},
}


def random_teacher(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomTeacherWarning: random weights are the point here
        torch.manual_seed(0)
        return create_teacher(spec)


@pytest.fixture(scope="module", params=list(SPECS))
def teacher(request):
    return random_teacher(SPECS[request.param])


def test_r0_is_the_teacher(teacher):
    x = torch.randn(3, 3, 32, 32)
    tome = ToMe(teacher, 0)
    with torch.no_grad():
        torch.testing.assert_close(tome.embed(x), teacher.embed(x), rtol=0, atol=1e-6)
        final = teacher.embed_tokens(x)
        for i in range(teacher.depth):
            final = teacher.run_block(i, final)
        torch.testing.assert_close(tome.forward_head(tome.forward_features(x)[0]), teacher.pool_norm_head(final),
                                   rtol=0, atol=1e-6)
    assert tome.schedule == [0] * teacher.depth and tome.forward_features(x)[1] is None


def test_the_teacher_is_left_as_it_was(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    ref = teacher.embed(x)
    tome = ToMe(teacher, 4)
    with torch.no_grad():
        merged = tome.embed(x)
    assert not torch.allclose(merged, ref)  # merging changes the output ...
    torch.testing.assert_close(teacher.embed(x), ref, rtol=0, atol=0)  # ... but not the teacher
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tome.parameters())


def test_token_count_after_every_block(teacher):
    x = torch.randn(2, 3, 32, 32)
    prefix = teacher.num_prefix_tokens
    for r, want_schedule in ((3, [3, 3, 3]), ([6, 2, 0], [6, 2, 0]), (5, [5, 5, 3])):  # 16 -> 11 -> 6 -> 3: capped
        tome = ToMe(teacher, r)
        blocks = []
        with torch.no_grad():
            tome.forward_features(x, every_block=blocks)
        patches, want = 16, []
        for ri in want_schedule:
            patches -= ri
            want.append(prefix + patches)
        assert tome.schedule == want_schedule and tome.token_counts == want
        assert [t.shape[1] for t, _ in blocks] == want
        for tokens, size in blocks:
            if size is not None:  # every token stands for its patches; the prefix tokens for themselves
                assert size.shape == (*tokens.shape[:2], 1)
                torch.testing.assert_close(size.sum(dim=1).squeeze(-1), torch.full((2,), 16.0 + prefix))
                assert torch.equal(size[:, :prefix], torch.ones(2, prefix, 1))


def test_class_token_is_kept_through_the_first_merge(teacher):
    """Merging happens after the attention and the MLP is per token, so the class token leaving a
    merging first block is the teacher's own: it is kept, not merged, and still first."""
    x = torch.randn(2, 3, 32, 32)
    blocks = []
    with torch.no_grad():
        ToMe(teacher, 5).forward_features(x, every_block=blocks)
        own = teacher.run_block(0, teacher.embed_tokens(x))
    p = teacher.num_prefix_tokens
    torch.testing.assert_close(blocks[0][0][:, :p], own[:, :p], rtol=0, atol=1e-5)


def test_one_merge_step_by_hand():
    """Tokens 0 (class) 1 2 3 4: A = {0, 2, 4}, B = {1, 3}. Token 2's key points where token 1's
    does, token 4's nearly where token 3's does: with r = 1, 2 merges into 1; with r = 2, 4 into 3 too."""
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.1], [1.0, 0.3]]])
    x = torch.tensor([[[10.0], [1.0], [3.0], [5.0], [7.0]]])
    m = bipartite_soft_matching(keys, r=1, num_prefix=1)
    assert m.src.flatten().tolist() == [1] and m.dst.flatten().tolist() == [0]  # A[1] = token 2 -> B[0] = token 1
    merged, size = merge_weighted(m, x, None)
    # Order: class token, the kept A tokens (4), then B (1+2, 3).
    assert merged.flatten().tolist() == [10.0, 7.0, 2.0, 5.0] and size.flatten().tolist() == [1, 1, 2, 1]

    # A second step with sizes: the size-weighted mean, and sizes add up.
    keys2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    m2 = bipartite_soft_matching(keys2, r=1, num_prefix=1)
    merged2, size2 = merge_weighted(m2, merged, size)
    # A = {0, 2}, B = {1, 3}: token 2 (value 2, size 2) merges into token 1 (value 7, size 1) or 3 (5, 1);
    # its key equals token 3's, so into token 3: (2 * 2 + 5 * 1) / 3 = 3.
    assert merged2.flatten().tolist() == [10.0, 7.0, 3.0] and size2.flatten().tolist() == [1, 1, 3]

    m = bipartite_soft_matching(keys, r=2, num_prefix=1)
    merged, size = merge_weighted(m, x, None)
    assert merged.flatten().tolist() == [10.0, 2.0, 6.0] and size.flatten().tolist() == [1, 2, 2]
    with pytest.raises(ToMeError, match="at most 2"):
        bipartite_soft_matching(keys, r=3, num_prefix=1)


def test_prefix_tokens_never_merge_and_stay_first():
    torch.manual_seed(0)
    keys = torch.randn(2, 9, 4)
    keys[:, :3] = keys[:, 3:6]  # the 3 prefix tokens look exactly like patches: still not merged
    x = torch.arange(9.0).expand(2, 9)[..., None]
    merged, size = merge_weighted(bipartite_soft_matching(keys, r=3, num_prefix=3), x, None)
    assert merged[:, :3, 0].tolist() == [[0.0, 1.0, 2.0]] * 2 and size[:, :3].flatten().tolist() == [1.0] * 6
    assert merged.shape == (2, 6, 1) and size.sum(dim=1).flatten().tolist() == [9.0, 9.0]


def test_proportional_attention_counts_a_token_of_size_s_as_s_copies(teacher):
    """A block on [c, a, a, b] and on [c, a (size 2), b] gives c, a and b the same outputs."""
    torch.manual_seed(0)
    c, a, b = torch.randn(3, 1, 1, teacher.width).unbind(0)
    parts = teacher.block_modules(1)
    p = teacher.num_prefix_tokens
    prefix = torch.randn(1, p - 1, teacher.width)
    with torch.no_grad():
        dup, _ = tome_block(parts, torch.cat([c, prefix, a, a, b], 1), None, 0, p)
        sizes = torch.tensor([1.0] * p + [2.0, 1.0]).view(1, -1, 1)
        prop, _ = tome_block(parts, torch.cat([c, prefix, a, b], 1), sizes, 0, p)
        plain, _ = tome_block(parts, torch.cat([c, prefix, a, b], 1), sizes, 0, p, prop_attn=False)
    want = torch.cat([dup[:, :p + 1], dup[:, p + 2:]], 1)
    torch.testing.assert_close(prop, want, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)


def test_merging_cuts_the_counted_flops(teacher):
    x = torch.randn(1, 3, 32, 32)
    flops = [count_flops(ToMe(teacher, r).embed, x) for r in (0, 2, 5)]
    assert flops[0] == pytest.approx(count_flops(teacher.embed, x), rel=1e-6)
    assert flops[0] > flops[1] > flops[2]


def test_schedules_and_bad_r(teacher):
    assert schedule(4, 8) == [8, 8, 8, 8]
    assert schedule(4, 8, inflect=-0.5) == [12, 9, 6, 4] and sum(schedule(4, 8, -0.5)) <= 32
    assert fraction_schedule(16, 3, 0.5) == [8, 4, 2] and fraction_schedule(196, 12, 0.27)[:3] == [53, 39, 28]
    with pytest.raises(ToMeError, match="at most half"):
        fraction_schedule(16, 3, 0.6)
    assert max_r(64, 4) == 15 and max_r(196, 12) == 16 and max_r(256, 24) == 10
    # The demo teacher (64 patches, 4 blocks): r = 12 leaves 16 patch tokens, 15 caps the last block.
    assert plan(12, 64, 4) == ([12, 12, 12, 12], [53, 41, 29, 17])
    assert plan(15, 64, 4)[0] == [15, 15, 15, 9]
    with pytest.raises(ToMeError, match="largest valid r for this model is 5"):
        ToMe(teacher, 6)  # 18 merges of 16 patch tokens
    with pytest.raises(ToMeError, match="largest valid r"):
        ToMe(teacher, [8, 8, 0])
    with pytest.raises(ToMeError, match="one int per block"):
        ToMe(teacher, [1, 2])
    with pytest.raises(ToMeError, match="negative"):
        ToMe(teacher, -1)
    with pytest.raises(ToMeError, match="must be an int"):
        ToMe(teacher, "8")


@pytest.mark.parametrize("model", ["cls_token", "no_cls_mean", "no_cls_map"])
def test_agrees_with_the_authors_code(model):
    """Logits of facebookresearch/ToMe's own timm patch on tiny ViTs (tests/fixtures/tome_reference, made by
    make_tome_reference.py), capped schedules included: one with a class token, and two without one (pooled
    by the mean and by a MAP head), where the authors keep the unmerged tokens in their matching order."""
    folder = FIXTURES / "tome_reference"
    ref = json.loads((folder / "reference.json").read_text())["models"][model]
    weights, io = ref["files"]
    teacher = create_teacher({**ref["spec"], "pretrained": str(folder / weights)})
    assert teacher.num_prefix_tokens == (1 if model == "cls_token" else 0)
    io = load_file(str(folder / io))
    for r in ref["schedules"]:
        tome = ToMe(teacher, r)
        with torch.no_grad():
            torch.testing.assert_close(tome(io["images"]), io[f"r={r}"], rtol=0, atol=1e-5)
    assert ToMe(teacher, [8, 6, 1]).schedule == [8, 4, 1]


# ----------------------------------------------------------------------------- the newer teacher kinds
# SigLIP (no class token, MAP head; 72 = 2 heads of 36), mean pooling with norm or fc_norm, SwiGLU with
# LayerScale and registers, qk-norm; as timm teachers and as open_clip SigLIP towers with a logit bias.
NEW_SPECS = {**TIMM_SPECS, "openclip_siglip_map": openclip_spec("tiny_siglip_map"),
             "openclip_siglip_gap_proj": openclip_spec("tiny_siglip_gap", proj="linear")}


@pytest.fixture(scope="module", params=list(NEW_SPECS))
def new_teacher(request):
    t = random_teacher(copy.deepcopy(NEW_SPECS[request.param]))
    with torch.no_grad():  # LayerScale, norms and the MAP latent away from their initial values
        for p in t.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return t


def test_r0_is_the_new_teacher_exactly(new_teacher):
    teacher = new_teacher
    x = torch.randn(3, 3, 32, 32)
    tome = ToMe(teacher, 0)
    with torch.no_grad():
        torch.testing.assert_close(tome.embed(x), teacher.embed(x), rtol=0, atol=1e-6)
        tokens, size = tome.forward_features(x)
        torch.testing.assert_close(tokens, teacher.forward_tokens(x, layer=teacher.depth), rtol=0, atol=1e-6)
        torch.testing.assert_close(tome(x), teacher.pool_norm_head(tokens), rtol=0, atol=1e-6)
    assert size is None and tome.token_counts == [teacher.num_prefix_tokens + 16] * teacher.depth


def test_r_above_0_runs_on_the_new_teachers(new_teacher):
    teacher = new_teacher
    x = torch.randn(2, 3, 32, 32)
    tome = ToMe(teacher, 3)
    blocks = []
    with torch.no_grad():
        out = tome.embed(x)
        tome.forward_features(x, every_block=blocks)
    assert out.shape == teacher.embed(x).shape and torch.isfinite(out).all()
    assert not torch.allclose(out, teacher.embed(x), atol=1e-4)
    p = teacher.num_prefix_tokens
    assert [t.shape[1] for t, _ in blocks] == tome.token_counts == [p + 13, p + 10, p + 7]
    for tokens, size in blocks:  # the sizes still count every patch token once
        torch.testing.assert_close(size.sum(dim=1).squeeze(-1), torch.full((2,), 16.0 + p))


def test_qk_norm_keys_are_the_normed_ones():
    """On the qk-norm tower the attention (and so the merging metric) uses q_norm(q), k_norm(k): r = 0 agrees
    with the teacher only because they are applied (a block without them gives another output)."""
    teacher = random_teacher(copy.deepcopy(TIMM_SPECS["tiny_qknorm_swiglu_avg"]))
    parts = teacher.block_modules(0)
    with torch.no_grad():
        parts.q_norm.weight.mul_(3.0)  # a norm far from the identity
        x = teacher.embed_tokens(torch.randn(2, 3, 32, 32))
        ours, _ = tome_block(parts, x, None, 0, teacher.num_prefix_tokens)
        without, _ = tome_block(dataclasses.replace(parts, q_norm=torch.nn.Identity(), k_norm=torch.nn.Identity()),
                                x, None, 0, teacher.num_prefix_tokens)
        torch.testing.assert_close(ours, teacher.run_block(0, x), rtol=0, atol=1e-5)
    assert not torch.allclose(without, ours, atol=1e-4)


def test_without_a_class_token_the_first_token_may_merge():
    """Tokens 0 1 2 3: A = {0, 2}, B = {1, 3}; token 0's key is token 1's. With a class token (num_prefix 1)
    token 0 is kept and 2 merges; without one (SigLIP) token 0 merges into token 1."""
    keys = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]])
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    merged, size = merge_weighted(bipartite_soft_matching(keys, r=1, num_prefix=0), x, None)
    assert merged.flatten().tolist() == [5.0, 2.0, 7.0] and size.flatten().tolist() == [1, 2, 1]
    merged, _ = merge_weighted(bipartite_soft_matching(keys, r=1, num_prefix=1), x, None)
    assert merged[0, 0, 0] == 1.0 and merged.shape[1] == 3
