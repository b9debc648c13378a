"""A student built from a teacher inherits its blocks, norm and head exactly."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import GOLDEN
from students import SparseFormer
from bootstrap.stepper import optimizer_param_groups
from students.sparseformer.construct import (
    BootstrapOptions,
    bootstrap_student,
    inherited_units,
    student_config,
)
from teachers import create_teacher

RELEASED = json.loads((GOLDEN / "released_configs.json").read_text())


def tiny_clip_cfg(quick_gelu: bool):
    return {
        "embed_dim": 32,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 6, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


TEACHER_SPECS = {
    "openclip_quickgelu": {"kind": "openclip", "model": "tiny-quickgelu", "model_cfg": tiny_clip_cfg(True),
                           "pretrained": None},
    "openclip_gelu": {"kind": "openclip", "model": "tiny-gelu", "model_cfg": tiny_clip_cfg(False), "pretrained": None},
    "timm_vit": {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                 "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 64, "num_heads": 2,
                                  "num_classes": 10}},
    "dinov2_reg": {"kind": "timm", "model": "vit_small_patch14_reg4_dinov2", "pretrained": None,
                   "model_kwargs": {"img_size": 28, "patch_size": 7, "depth": 6, "embed_dim": 64, "num_heads": 2,
                                    "init_values": 1.0}},
}


def make_teacher(kind):
    with pytest.warns(UserWarning):
        teacher = create_teacher(TEACHER_SPECS[kind])
    if kind == "dinov2_reg":  # random LayerScale, so that folding it is really tested
        with torch.no_grad():
            for name, p in teacher.model.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(torch.rand_like(p) + 0.5)
    # random norms and biases too: an identity LayerNorm would hide a wrong mapping
    with torch.no_grad():
        for name, p in teacher.model.named_parameters():
            if p.ndim == 1 and not name.endswith("gamma"):
                p.add_(0.1 * torch.randn_like(p))
    return teacher


@pytest.fixture(scope="module", params=list(TEACHER_SPECS))
def pair(request):
    torch.manual_seed(0)
    teacher = make_teacher(request.param)
    student, policy = bootstrap_student(teacher, tokens=9, num_points=4, conv_dim=16, pg_inner_dim=16)
    return request.param, teacher, student.eval(), policy


def test_every_inherited_block_computes_the_teacher_block(pair):
    _, teacher, student, _ = pair
    drop = teacher.depth // 3
    units = inherited_units(student)
    assert len(units) == teacher.depth - drop
    x = torch.randn(2, 1 + teacher.num_patches, teacher.width)
    with torch.no_grad():
        for j, unit in enumerate(units):
            ours, _ = unit(x, None, None)
            theirs = teacher.run_block(drop + j, x)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_final_norm_and_head_equal_the_teachers_pooled_path(pair):
    _, teacher, student, _ = pair
    tokens = torch.randn(3, 1 + teacher.num_prefix_tokens + teacher.num_patches, teacher.width)
    with torch.no_grad():
        theirs = teacher.pool_norm_head(tokens)
        ours = student.forward_head(tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_student_output_lives_in_the_teachers_target_space(pair):
    kind, teacher, student, _ = pair
    x = torch.randn(2, 3, *teacher.preprocess.size)
    with torch.no_grad():
        target = teacher.embed(x)
        if teacher.target == "proj":
            ours = student(x)
        else:
            ours = student.forward_head(student.forward_features(x)[0], pre_logits=True)
    assert ours.shape == target.shape


def test_supervised_classifier_gives_the_same_logits_through_the_student_head():
    torch.manual_seed(0)
    teacher = make_teacher("timm_vit")
    student, _ = bootstrap_student(teacher, tokens=9, num_points=4, conv_dim=16, pg_inner_dim=16)
    feat = torch.randn(4, teacher.width)
    with torch.no_grad():
        theirs = teacher.model.head(teacher.model.fc_norm(teacher.model.norm(feat)))
        ours = student.proj(student.norm(feat))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert student.num_classes == 10


def test_parameter_policy_trains_new_parts_and_first_third_freezes_the_rest(pair):
    _, teacher, student, policy = pair
    n = teacher.depth  # 6: drop 2, fine-tune 2, freeze 2 (+ norm and head)
    frozen_layers = {name.split(".")[1] for name in policy.frozen if name.startswith("layers.")}
    last_two = {str(i) for i in student.unit_layer_index[-(n // 3):]}
    assert frozen_layers == last_two
    assert not any(name.startswith(("feat_extractor", "initial_", "cls_embedding", "layers.0.")) for name in policy.frozen)
    if isinstance(student.proj, torch.nn.Linear):
        assert "proj.weight" in policy.frozen
    assert "norm.weight" in policy.frozen
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in student.parameters() if not p.requires_grad)
    assert (trainable, frozen) == (policy.num_trainable, policy.num_frozen)
    assert "trainable" in policy.summary()
    groups = optimizer_param_groups(student, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(student.initial_roi.weight) not in decayed and id(student.layers[0].norm1.weight) not in decayed
    assert id(student.layers[0].attn.qkv.weight) in decayed


def _stub_teacher(depth, width, patches, act, eps, head_out, head_bias):
    head = {"weight": torch.zeros(head_out, width)}
    if head_bias:
        head["bias"] = torch.zeros(head_out)
    return SimpleNamespace(
        depth=depth, width=width, num_heads=width // 64, num_patches=patches, mlp_act=act, mlp_hidden_dim=4 * width,
        norm_eps=eps, head_state_dict=lambda: head, has_class_token=True, mlp_layer="mlp", qk_norm=False,
        pool="token", pool_spec=None, norm_before_pool=True,
        preprocess=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    )


@pytest.mark.parametrize(
    "name,teacher",
    [
        ("sparseformer_btsp_openai_clip_base", _stub_teacher(12, 768, 196, "quick_gelu", 1e-5, 512, False)),
        ("sparseformer_btsp_openai_clip_large", _stub_teacher(24, 1024, 256, "quick_gelu", 1e-5, 768, False)),
        ("sparseformer_btsp_augreg_base", _stub_teacher(12, 768, 196, "gelu", 1e-6, 1000, True)),
        ("sparseformer_btsp_augreg_large", _stub_teacher(24, 1024, 576, "gelu", 1e-6, 1000, True)),
    ],
)
def test_defaults_reproduce_the_released_btsp_configurations(name, teacher):
    # ViT-L/16 at 384 has 576 patches; the released student has 49 tokens, not 144
    tokens = 49 if name == "sparseformer_btsp_augreg_large" else None
    cfg = student_config(teacher, BootstrapOptions(tokens=tokens))
    ref = RELEASED[name]
    ours = cfg.to_dict()
    expected = {k: v for k, v in ref["config"].items() if k not in ("normalization_factor", "model_type")}
    ours = {k: v for k, v in ours.items() if k not in ("normalization_factor", "model_type")}
    if name.startswith("sparseformer_btsp_augreg"):
        # the student keeps timm's LayerNorm eps so that inherited blocks stay exact
        assert ours["compatible_config"].pop("ln_eps") == 1e-6
        expected = json.loads(json.dumps(expected))
        expected["compatible_config"].pop("ln_eps")
    assert ours == expected
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in SparseFormer(cfg).state_dict().items()}
    assert shapes == ref["state_dict"]


def test_unknown_option_names_the_nearest():
    with pytest.raises(ValueError, match="unknown key 'token' in student options.*'tokens'"):
        BootstrapOptions.from_dict({"token": 49})
