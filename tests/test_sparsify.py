"""Sparsifiner students from every teacher kind: the teacher's whole tower, exactly, plus fresh predictors."""

import copy
import math
import warnings

import pytest
import torch

from students.losses import token_loss
from students.sparsifiner.training import attention_reconstruction_loss
from students import ConfigError, Sparsifiner, sparsify
from teachers import RandomTeacherWarning, create_teacher
# The teachers' own tiny specs: two open_clip towers (QuickGELU; GELU with LayerScale), a timm ViT with a
# head, a DINOv2 with registers and LayerScale.
from test_teachers import SPECS

SMALL = dict(basis_coef_topk=2)  # 4x4 patches: K = 17 // 6 = 2 basis rows


@pytest.fixture(scope="module", params=list(SPECS))
def teacher(request):
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        t = create_teacher(copy.deepcopy(SPECS[request.param]))
    with torch.no_grad():  # no weight agrees with a fresh model's by its initialisation
        for p in t.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return t


def _images(teacher, n=2):
    return torch.randn(n, 3, *teacher.preprocess.size, generator=torch.Generator().manual_seed(4))


def test_keep_rate_one_is_the_teacher_exactly(teacher):
    student, _ = sparsify(teacher, keep_rate=1.0, **SMALL)
    student.eval()
    x = _images(teacher)
    pre_logits = teacher.target != "proj"  # timm teachers' target is the normed class token
    with torch.no_grad():
        assert torch.allclose(student(x, pre_logits=pre_logits), teacher.embed(x), atol=1e-5)
        d = student.forward_details(x)
    assert torch.allclose(d.pre_logits if pre_logits else d.output, teacher.embed(x), atol=1e-5)
    assert torch.allclose(d.tokens, teacher.final_tokens(x), atol=1e-5)
    for ours, theirs in zip(d.attn, teacher.attention_maps(x)):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert d.attn_masks[0][:, :, : teacher.num_prefix_tokens].all()


def test_every_mask_row_keeps_exactly_its_budget(teacher):
    student, _ = sparsify(teacher, **SMALL)
    n = teacher.num_prefix_tokens + teacher.num_patches
    assert student.budgets == [math.ceil(0.25 * n)] * teacher.depth
    with torch.no_grad():
        d = student.eval().forward_details(_images(teacher))
    p = teacher.num_prefix_tokens
    for mask in d.attn_masks:
        assert (mask[:, :, p:].sum(-1) == math.ceil(0.25 * n)).all()
        assert mask[:, :, :p].all()  # class token and registers attend densely


def test_policy_trains_predictors_then_the_backbone(teacher):
    student, policy = sparsify(teacher, **SMALL)
    predictors = {n for n, _ in student.named_parameters() if ".mask_predictor." in n}
    assert set(policy["reconstruct"].trainable) == predictors
    assert {n for n, p in student.named_parameters() if p.requires_grad} == predictors
    assert student.phase == "reconstruct"
    # The reconstruct loss on the teacher's maps reaches the predictors alone.
    x = _images(teacher)
    student.train()
    d = student.forward_details(x, attention=False)
    attention_reconstruction_loss(d.approx_attn, teacher.attention_maps(x)).backward()
    assert all(p.grad is not None and p.grad.any() for n, p in student.named_parameters() if n in predictors)
    policy.apply(student, "sparse")
    assert student.phase == "sparse"
    assert {n for n, p in student.named_parameters() if p.requires_grad} == \
        {n for n, _ in student.named_parameters()} - predictors
    d = student.forward_details(x, attention=False)
    p = teacher.num_prefix_tokens
    token_loss(d.tokens[:, p:], teacher.final_tokens(x)[:, p:]).backward()
    with pytest.raises(ValueError, match="reconstruct and sparse"):
        policy["dense"]


def test_some_blocks_sparsified_and_per_block_rates(teacher):
    student, policy = sparsify(teacher, keep_rate=[0.5], blocks=[-1], **SMALL)
    assert student.sparse_blocks == [teacher.depth - 1]
    assert all(f"blocks.{teacher.depth - 1}." in n for n in policy["reconstruct"].trainable)


@pytest.mark.parametrize("options, message", [
    ({"keep_rte": 0.3}, "Did you mean 'keep_rate'"),
    ({"keep_rate": 0}, r"outside \(0, 1\]"),
    ({"keep_rate": [0.5, 0.5]}, "2 rates for"),
    ({"blocks": [7]}, "distinct block indices"),
    ({"basis_coef_topk": 8}, r"basis_coef_topk=8 .* valid range: 1..2"),
])
def test_bad_options_name_the_key(options, message):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        t = create_teacher(copy.deepcopy(SPECS["timm_vit"]))
    with pytest.raises(ConfigError, match=message):
        sparsify(t, **options)


def test_student_is_a_sparsifiner_with_the_teachers_preprocessing(teacher):
    student, _ = sparsify(teacher, **SMALL)
    assert isinstance(student, Sparsifiner)
    assert student.pretrained_cfg["input_size"] == (3, *teacher.preprocess.size)
    assert student.pretrained_cfg["mean"] == tuple(teacher.preprocess.mean)
