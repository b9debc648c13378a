"""Teachers: one interface over open_clip and timm ViTs, exact weight export.

Tiny random-weight models only (no network): every parameter is perturbed
after building so LayerScale gammas, norm affines and biases are all
non-trivial and a wrong mapping cannot hide behind ones and zeros.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import teachers
from teachers import (
    BLOCK_KEYS,
    RandomTeacherWarning,
    TeacherSpecError,
    TeacherWeightsError,
    UnsupportedTeacherError,
    create_teacher,
)


def clip_cfg(quick_gelu: bool, ls_init_value=None, **vision) -> dict:
    return {
        "embed_dim": 16,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                       "ls_init_value": ls_init_value, **vision},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


SPECS = {
    "clip_quickgelu": {"kind": "openclip", "model": "tiny-clip-quickgelu", "model_cfg": clip_cfg(True),
                       "pretrained": None},
    "clip_gelu_ls": {"kind": "openclip", "model": "tiny-clip-ls", "model_cfg": clip_cfg(False, 1e-5),
                     "pretrained": False},
    "timm_vit": {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": False,
                 "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 64, "num_heads": 2,
                                  "num_classes": 10}},
    "dinov2_reg4": {"kind": "timm", "model": "vit_small_patch14_reg4_dinov2", "pretrained": False, "image_size": 28,
                    "model_kwargs": {"patch_size": 7, "depth": 3, "embed_dim": 64, "num_heads": 2}},
}

# name: (family, target, depth, width, heads, grid, prefix, mlp_act, layer_scale, eps, embed_dim, classes)
EXPECTED = {
    "clip_quickgelu": ("clip", "proj", 2, 64, 2, (4, 4), 1, "quick_gelu", False, 1e-5, 16, 0),
    "clip_gelu_ls": ("clip", "proj", 2, 64, 2, (4, 4), 1, "gelu", True, 1e-5, 16, 0),
    "timm_vit": ("supervised", "norm", 3, 64, 2, (4, 4), 1, "gelu", False, 1e-6, 64, 10),
    "dinov2_reg4": ("dino", "norm", 3, 64, 2, (4, 4), 5, "gelu", True, 1e-6, 64, 0),
}


def build(spec: dict) -> teachers.Teacher:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        return create_teacher(copy.deepcopy(spec))


def perturb(model: nn.Module) -> None:
    """Make every parameter non-trivial (LayerScale 1e-5, norm ones, zero biases would hide bugs)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    out = {}
    for name, spec in SPECS.items():
        t = build(spec)
        perturb(t.model)
        out[name] = t
    return out


@pytest.fixture(params=list(SPECS))
def teacher(request, built):
    return built[request.param]


def images(t, n=2):
    return torch.randn(n, 3, *t.preprocess.size, generator=torch.Generator().manual_seed(2))


def fresh_block(t) -> nn.Module:
    """A timm ViT Block configured like the teacher (what the student's cortex blocks are)."""
    from timm.layers import QuickGELU
    from timm.models.vision_transformer import Block

    act = QuickGELU if t.mlp_act == "quick_gelu" else nn.GELU
    return Block(t.width, t.num_heads, mlp_ratio=t.mlp_ratio, qkv_bias=True, act_layer=act,
                 norm_layer=partial(nn.LayerNorm, eps=t.norm_eps)).eval()


# ------------------------------------------------------------------ interface
@pytest.mark.parametrize("name", list(SPECS))
def test_architecture_attributes(built, name):
    t = built[name]
    family, target, depth, width, heads, grid, prefix, act, ls, eps, embed_dim, classes = EXPECTED[name]
    assert (t.family, t.target, t.depth, t.width, t.num_heads) == (family, target, depth, width, heads)
    assert t.grid_size == grid and t.num_patches == grid[0] * grid[1]
    assert t.patch_size == (t.preprocess.size[0] // grid[0],) * 2
    assert (t.num_prefix_tokens, t.mlp_act, t.layer_scale, t.norm_eps) == (prefix, act, ls, eps)
    assert (t.embed_dim, t.num_classes, t.mlp_hidden_dim) == (embed_dim, classes, 4 * width)
    assert t.kind == SPECS[name]["kind"] and t.name == SPECS[name]["model"]
    json.dumps(t.spec)  # saved with the run


def test_embed_is_the_models_own_target(teacher):
    x = images(teacher)
    out = teacher.embed(x)
    assert out.shape == (2, teacher.embed_dim)
    assert torch.equal(teacher(x), out)
    m = teacher.model
    with torch.no_grad():
        if teacher.kind == "openclip":
            ref = m.encode_image(x)
        else:
            ref = m.forward_head(m.forward_features(x), pre_logits=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_embed_rejects_wrong_image_size(teacher):
    with pytest.raises(ValueError, match="expects images"):
        teacher.embed(torch.zeros(1, 3, 16, 16))


def test_block_state_dict_reproduces_each_block(teacher):
    tokens = torch.randn(2, teacher.num_prefix_tokens + teacher.num_patches, teacher.width,
                         generator=torch.Generator().manual_seed(3))
    for i in range(teacher.depth):
        sd = teacher.block_state_dict(i)
        assert tuple(sd) == BLOCK_KEYS
        block = fresh_block(teacher)
        block.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(block(tokens), teacher.run_block(i, tokens), rtol=0, atol=1e-5)


def test_layer_scale_is_really_folded(built):
    for name in ("clip_gelu_ls", "dinov2_reg4"):
        t = built[name]
        blk = t.model.blocks[0] if t.kind == "timm" else t.model.visual.transformer.resblocks[0]
        raw_proj = blk.attn.proj.weight if t.kind == "timm" else blk.attn.out_proj.weight
        raw_fc2 = blk.mlp.fc2.weight if t.kind == "timm" else blk.mlp.c_proj.weight
        sd = t.block_state_dict(0)
        assert not torch.allclose(sd["attn.proj.weight"], raw_proj)
        assert not torch.allclose(sd["mlp.fc2.weight"], raw_fc2)


def test_state_dicts_are_copies(teacher):
    sd = teacher.block_state_dict(-1)
    before = teacher.embed(images(teacher))
    for v in sd.values():
        assert not v.requires_grad
        v.zero_()
    teacher.norm_state_dict()["weight"].zero_()
    torch.testing.assert_close(teacher.embed(images(teacher)), before, rtol=0, atol=0)


def test_pool_norm_head_is_the_final_path(teacher):
    x = images(teacher)
    tokens = teacher.embed_tokens(x)
    assert tokens.shape == (2, teacher.num_prefix_tokens + teacher.num_patches, teacher.width)
    for i in range(teacher.depth):
        tokens = teacher.run_block(i, tokens)
    out = teacher.pool_norm_head(tokens)
    with torch.no_grad():
        full = teacher.model.encode_image(x) if teacher.kind == "openclip" else teacher.model(x)
    torch.testing.assert_close(out, full, rtol=0, atol=1e-6)
    if teacher.head_state_dict() is None or teacher.target == "proj":
        torch.testing.assert_close(out, teacher.embed(x), rtol=0, atol=1e-6)


def test_student_rebuilt_from_state_dicts_matches_teacher(teacher):
    """The inheritance the student does: fresh blocks + final norm + head from the exported weights."""
    x = images(teacher)
    tokens = teacher.embed_tokens(x)
    with torch.no_grad():
        for i in range(teacher.depth):
            block = fresh_block(teacher)
            block.load_state_dict(teacher.block_state_dict(i))
            tokens = block(tokens)
        norm = teacher.norm_state_dict()
        pre_logits = F.layer_norm(tokens[:, 0], (teacher.width,), norm["weight"], norm["bias"], teacher.norm_eps)
        head = teacher.head_state_dict()
        out = pre_logits if head is None else F.linear(pre_logits, head["weight"], head.get("bias"))
    own = teacher.embed_tokens(x)
    for i in range(teacher.depth):
        own = teacher.run_block(i, own)
    torch.testing.assert_close(out, teacher.pool_norm_head(own), rtol=0, atol=1e-5)
    target = out if teacher.target == "proj" else pre_logits
    torch.testing.assert_close(target, teacher.embed(x), rtol=0, atol=1e-5)


def test_heads(built):
    clip = built["clip_quickgelu"].head_state_dict()
    assert set(clip) == {"weight"}
    assert torch.equal(clip["weight"], built["clip_quickgelu"].model.visual.proj.t())
    vit = built["timm_vit"]
    assert torch.equal(vit.head_state_dict()["weight"], vit.model.head.weight)
    assert torch.equal(vit.head_state_dict()["bias"], vit.model.head.bias)
    assert built["dinov2_reg4"].head_state_dict() is None
    assert torch.equal(built["clip_gelu_ls"].norm_state_dict()["bias"], built["clip_gelu_ls"].model.visual.ln_post.bias)
    assert torch.equal(vit.norm_state_dict()["weight"], vit.model.norm.weight)


def test_teacher_stays_eval_without_grads(teacher):
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = images(teacher).requires_grad_(True)
    with torch.enable_grad():
        out = teacher.embed(x)
        blk = teacher.run_block(0, teacher.embed_tokens(x.detach()))
    assert not out.requires_grad and not blk.requires_grad and out.grad_fn is None


def test_clip_text_tower(built):
    t = built["clip_quickgelu"]
    tokens = t.tokenizer(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, 8)
    out = t.encode_text(tokens)
    assert out.shape == (2, t.embed_dim) and not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, t.model.encode_text(tokens), rtol=0, atol=0)
    assert t.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    vit = built["timm_vit"]
    assert vit.tokenizer is None and vit.logit_scale is None
    with pytest.raises(NotImplementedError, match="no text tower"):
        vit.encode_text(tokens)


def test_image_size_key(built):
    assert built["dinov2_reg4"].preprocess.size == (28, 28)
    t = build({**SPECS["clip_quickgelu"], "image_size": 40})
    assert t.preprocess.size == (40, 40) and t.grid_size == (5, 5)
    assert t.model_cfg["vision_cfg"]["image_size"] == 40 and t.model_cfg["embed_dim"] == 16
    assert t.embed(torch.zeros(1, 3, 40, 40)).shape == (1, 16)
    with pytest.raises(TeacherSpecError, match="disagree"):
        build({**SPECS["timm_vit"], "image_size": 48})


# ------------------------------------------------------------------ transforms
def test_eval_transforms_match_the_libraries(built):
    import timm
    from open_clip.transform import PreprocessCfg, image_transform_v2

    img = Image.fromarray((torch.rand(45, 60, 3) * 255).byte().numpy())
    clip = built["clip_quickgelu"]
    ref = image_transform_v2(PreprocessCfg(**clip.model.visual.preprocess_cfg), is_train=False)
    torch.testing.assert_close(clip.eval_transform()(img), ref(img))
    vit = built["timm_vit"]
    p = vit.preprocess
    ref = timm.data.create_transform(input_size=(3, *p.size), interpolation=p.interpolation, mean=p.mean, std=p.std,
                                     crop_pct=p.crop_pct)
    torch.testing.assert_close(vit.eval_transform()(img), ref(img))


def test_train_transform(teacher):
    img = Image.fromarray((torch.rand(45, 60, 3) * 255).byte().numpy()).convert("L")
    assert teacher.train_transform()(img).shape == (3, *teacher.preprocess.size)
    assert teacher.train_transform(scale=(0.5, 1.0), hflip=0.0, color_jitter=0.4)(img).shape[0] == 3
    with pytest.raises(TeacherSpecError, match="did you mean 'scale'|Did you mean 'scale'"):
        teacher.train_transform(scael=(0.5, 1.0))


# ------------------------------------------------------------------ weights
def _state_dict(t):
    return {k: v.detach().clone().contiguous() for k, v in t.model.state_dict().items()}


@pytest.mark.parametrize("name,suffix", [("clip_quickgelu", ".safetensors"), ("clip_gelu_ls", ".pt"),
                                         ("timm_vit", ".safetensors"), ("dinov2_reg4", ".pt")])
def test_local_weights_file(built, tmp_path, name, suffix):
    src = built[name]
    path = tmp_path / f"weights{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(_state_dict(src), str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomTeacherWarning)
        t = create_teacher({**SPECS[name], "pretrained": str(path)})
    x = images(src)
    torch.testing.assert_close(t.embed(x), src.embed(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(t.model(x), src.model(x), rtol=0, atol=0)  # incl. the head
    assert t.spec["pretrained"] == str(path.resolve())


def test_local_file_of_another_model_fails_naming_it(built, tmp_path):
    path = tmp_path / "dino.safetensors"
    save_file(_state_dict(built["dinov2_reg4"]), str(path))
    with pytest.raises(TeacherWeightsError, match="dino.safetensors"):
        create_teacher({**SPECS["timm_vit"], "pretrained": str(path)})
    with pytest.raises(TeacherWeightsError, match="dino.safetensors"):
        create_teacher({**SPECS["clip_quickgelu"], "pretrained": str(path)})


@pytest.mark.parametrize("kind", ["clip_quickgelu", "timm_vit"])
@pytest.mark.parametrize("value", [False, None])
def test_random_weights_warn(kind, value):
    with pytest.warns(RandomTeacherWarning, match="RANDOM"):
        create_teacher({**SPECS[kind], "pretrained": value})


@pytest.fixture
def offline(monkeypatch):
    """The hub switched off (as with HF_HUB_OFFLINE=1): nothing may touch the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(teachers.hub, "hub_reachable", _no_network)


def _no_network(*_, **__):
    raise AssertionError("the network was probed")


@pytest.mark.parametrize("spec,names", [
    ({"kind": "openclip", "model": "ViT-B-32-quickgelu", "pretrained": "openai"}, ["ViT-B-32-quickgelu", "openai"]),
    ({"kind": "timm", "model": "vit_tiny_patch16_224.augreg_in21k", "pretrained": True, "model_kwargs": {"depth": 1}},
     ["vit_tiny_patch16_224.augreg_in21k"]),
])
def test_unobtainable_weights_fail_fast_and_say_how_to_supply(offline, tmp_path, spec, names):
    start = time.monotonic()
    with pytest.raises(TeacherWeightsError) as err:
        create_teacher({**spec, "cache_dir": str(tmp_path)})
    assert time.monotonic() - start < 10
    message = str(err.value)
    for word in names + ["cache_dir", "pretrained: /path/to/"]:
        assert word in message


def test_unreachable_hub_fails_without_retrying(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(teachers.hub, "hub_reachable", lambda *a, **k: False)  # the cache try runs offline
    with pytest.raises(TeacherWeightsError, match="cannot be reached"):
        create_teacher({"kind": "openclip", "model": "ViT-B-32-quickgelu", "pretrained": "openai",
                        "cache_dir": str(tmp_path)})
    assert constants.HF_HUB_OFFLINE is False  # restored after the cache-only try


@pytest.mark.parametrize("spec,match", [
    ({"kind": "openclip", "model": "ViT-B-32", "pretrained": "opneai"}, "Did you mean 'openai'"),
    ({"kind": "openclip", "model": "ViT-B-32", "pretrained": True}, "tags: .*openai"),
    ({"kind": "openclip", "model": "ViT-B-32", "pretrained": "openai"}, "use model 'ViT-B-32-quickgelu'"),
    ({"kind": "openclip", "model": "tiny", "model_cfg": clip_cfg(True), "pretrained": "openai"}, "local weights"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": "augreg_in21k_ft_in1kk"},
     "Did you mean 'augreg_in21k_ft_in1k'"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": True, "model_kwargs": {"num_classes": 10}},
     "1000-class head"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": "/no/such/weights.safetensors"},
     "does not exist"),
])
def test_bad_weights_requests_fail_before_any_download(offline, spec, match):
    with pytest.raises(TeacherSpecError, match=match):
        create_teacher(spec)


# ------------------------------------------------------------------ bad specs
@pytest.mark.parametrize("spec,match", [
    ({"kind": "open_clip", "model": "ViT-B-32", "pretrained": None}, "unknown kind 'open_clip'.*'openclip'"),
    ({"model": "ViT-B-32", "pretrained": None}, "no 'kind'"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrianed": None}, "'pretrianed'.*'pretrained'"),
    ({"kind": "openclip", "model": "ViT-B-32", "pretrained": None, "model_kwargs": {}}, "is for kind timm"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224"}, "needs 'pretrained'"),
    ({"kind": "openclip", "model": "ViT-B-61", "pretrained": None}, "unknown open_clip model.*'ViT-B-16'"),
    ({"kind": "timm", "model": "vit_tiny_patch16_2240", "pretrained": None}, "'vit_tiny_patch16_224'"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None, "model_kwargs": {"embed_dm": 8}},
     "embed_dm"),
    ({"kind": "openclip", "model": "x", "model_cfg": {"embed_dim": 8}, "pretrained": None}, "lacks vision_cfg"),
    (["timm"], "mapping"),
])
def test_bad_spec(spec, match):
    with pytest.raises(TeacherSpecError, match=match):
        create_teacher(spec)


@pytest.mark.parametrize("spec,match", [
    ({"kind": "openclip", "model": "RN50", "pretrained": None}, "ModifiedResNet"),
    ({"kind": "openclip", "model": "rn", "pretrained": None,
      "model_cfg": {**clip_cfg(False), "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}}},
     "ModifiedResNet"),
    ({"kind": "openclip", "model": "coca_ViT-B-32", "pretrained": None}, "CoCa"),
    ({"kind": "openclip", "model": "pool", "pretrained": None,
      "model_cfg": clip_cfg(False, attentional_pool=True, attn_pooler_heads=2)}, "attentional pooler"),
    ({"kind": "openclip", "model": "avg", "pretrained": None, "model_cfg": clip_cfg(False, pool_type="avg")},
     "pool_type 'avg'"),
    ({"kind": "openclip", "model": "EVA02-E-14", "pretrained": None}, "post-norm blocks are unsupported"),
    ({"kind": "openclip", "model": "convnext_base", "pretrained": None}, "CNN"),
    ({"kind": "openclip", "model": "ViTamin-B", "pretrained": None}, "hybrid CNN stem"),
    ({"kind": "openclip", "model": "mlp", "pretrained": None,
      "model_cfg": {**clip_cfg(False), "vision_cfg": {"image_size": 32, "timm_model_name": "vit_tiny_patch16_224",
                                                      "timm_proj": "mlp"}}}, "MLP projection"),
    ({"kind": "openclip", "model": "tanh", "pretrained": None,
      "model_cfg": clip_cfg(False, act_kwargs={"approximate": "tanh"})}, "activation"),
    ({"kind": "timm", "model": "vit_base_r50_s16_224", "pretrained": None}, "HybridEmbed"),
    ({"kind": "timm", "model": "vit_tiny_r_s16_p8_224", "pretrained": None, "model_kwargs": {"img_size": 32}},
     "hybrid"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None, "model_kwargs": {"global_pool": "max"}},
     "global_pool='max'"),
    ({"kind": "timm", "model": "vit_base_patch16_rope_reg1_gap_256", "pretrained": None,
      "model_kwargs": {"img_size": 32, "depth": 1, "rope_type": "mrope"}}, "RotaryEmbeddingMRope, a kind this"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None, "model_kwargs": {"norm_layer": "rmsnorm"}},
     "RMSNorm"),
    ({"kind": "timm", "model": "vit_small_patch16_18x2_224", "pretrained": None,
      "model_kwargs": {"img_size": 32, "depth": 1}}, "ParallelThingsBlock"),
    ({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None, "model_kwargs": {"act_layer": "relu"}},
     "activation"),
    ({"kind": "timm", "model": "vit_relpos_base_patch16_224", "pretrained": None}, "relative position"),
    ({"kind": "timm", "model": "deit_tiny_distilled_patch16_224", "pretrained": None}, "distilled DeiT"),
    ({"kind": "timm", "model": "resnet18", "pretrained": None}, "a CNN"),
])
def test_unsupported_models_list_what_is_supported(spec, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        with pytest.raises(UnsupportedTeacherError, match=match) as err:
            create_teacher(spec)
    assert "Supported teachers" in str(err.value) and "vit_*_patch14_dinov2" in str(err.value)


def test_a_random_openclip_teacher_is_announced_once(caplog):
    """Our RandomTeacherWarning says it; open_clip's "No pretrained weights loaded" log line is not repeated."""
    import logging

    with caplog.at_level(logging.INFO), pytest.warns(teachers.RandomTeacherWarning, match="RANDOM weights"):
        teachers.create_teacher({**SPECS["clip_quickgelu"], "pretrained": None})
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    assert not logging.getLogger().filters  # the filter is gone again
