"""The teachers the field uses now (issue 19): SigLIP's MAP head and no class token, average pooling, SwiGLU
and GLU MLPs, qk-norm, LayerScale with registers, heads of 36/72 channels, MLP widths that are no ratio of
the width, open_clip timm towers with logit_bias; and SparseFormer students inheriting all of it.

Tiny random towers of each kind are in `tiny_towers` (registered with timm, so that open_clip configs can
name them too).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tiny_towers
from students.sparseformer.construct import BootstrapOptions, bootstrap_student, inherited_units, student_config
from teachers import SUPPORTED_TEACHERS, RandomTeacherWarning, create_teacher

ROOT = Path(__file__).resolve().parents[1]
KINDS = sorted(tiny_towers.TIMM_SPECS)
SPECS = {**{f"timm:{k}": v for k, v in tiny_towers.TIMM_SPECS.items()},
         "openclip:siglip_map": tiny_towers.openclip_spec("tiny_siglip_map"),
         "openclip:siglip_gap": tiny_towers.openclip_spec("tiny_siglip_gap"),
         "openclip:siglip_map_proj": tiny_towers.openclip_spec("tiny_siglip_map", proj="linear")}


def _teacher(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        teacher = create_teacher(SPECS[name])
    # Fresh LayerNorms, qk-norms and MAP latents are ones/zeros: move every image-tower weight so that
    # a weight the student failed to inherit shows.
    tower = [teacher.vit] + ([teacher.projection] if teacher.projection is not None else [])
    with torch.no_grad():
        for module in tower:
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return teacher


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request):
    teacher = _teacher(request.param)
    torch.manual_seed(1)
    student, policy = bootstrap_student(teacher)
    return request.param, teacher, student.eval(), policy


def _images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- teachers
EXPECTED = {  # pool, class token, mlp kind, activation, qk-norm, norm before pooling, prefix tokens
    "timm:tiny_siglip_map": ("map", False, "mlp", "gelu", False, True, 0),
    "timm:tiny_siglip_gap": ("avg", False, "mlp", "gelu", False, True, 0),
    "timm:tiny_dinov2_swiglu": ("token", True, "glu_gate_first", "silu", False, True, 5),
    "timm:tiny_qknorm_swiglu_avg": ("avg", True, "swiglu", "silu", True, False, 1),
    "openclip:siglip_map": ("map", False, "mlp", "gelu", False, True, 0),
    "openclip:siglip_gap": ("avg", False, "mlp", "gelu", False, True, 0),
    "openclip:siglip_map_proj": ("map", False, "mlp", "gelu", False, True, 0),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_teachers_read_their_architecture(name):
    t = _teacher(name)
    assert (t.pool, t.has_class_token, t.mlp_layer, t.mlp_act, t.qk_norm, t.norm_before_pool,
            t.num_prefix_tokens) == EXPECTED[name]
    assert (t.pool_spec is not None) == (t.pool == "map") and (t.pool_state_dict() is not None) == (t.pool == "map")
    if name.startswith("openclip"):
        assert t.family == "clip" and t.logit_bias == pytest.approx(-10.0) and t.target == "proj"
        assert t.embed_dim == (40 if name.endswith("proj") else t.width)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_pass_targets_equal_the_teachers_own_forward(name):
    """embedding = embed (a pre-logits target stops before the classifier), tokens = the final-normed tokens,
    attention = each block's softmax(q kᵀ / sqrt(d)) with qk-norm, read from timm's own unfused attention."""
    t = _teacher(name)
    x = _images()
    got = t.targets(x, ["embedding", "tokens", "attention"])
    torch.testing.assert_close(got["embedding"], t.embed(x), rtol=0, atol=1e-6)
    assert got["embedding"].shape == (2, t.embed_dim)
    tokens, probs = tiny_towers.timm_forward_with_attention(t.vit, x)
    # timm's forward_features ends with `norm` (Identity where the final norm is fc_norm).
    final = tokens if t.norm_before_pool else t._final_norm()(tokens)
    torch.testing.assert_close(got["tokens"], final, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["tokens"], t._final_norm()(_raw_tokens(t, x)), rtol=0, atol=1e-5)
    assert len(got["attention"]) == t.depth
    for ours, timms in zip(got["attention"], probs):
        torch.testing.assert_close(ours, timms, rtol=0, atol=1e-6)


def _raw_tokens(t, x):
    y = t.embed_tokens(x)
    for i in range(t.depth):
        y = t.run_block(i, y)
    return y


def test_a_supervised_timm_teachers_one_pass_embedding_is_its_pre_logits_feature():
    """Regression: the one-pass targets gave the classifier's logits as the embedding."""
    t = _teacher("timm:tiny_qknorm_swiglu_avg")
    assert t.num_classes == 7
    x = _images()
    emb = t.targets(x, ["embedding", "tokens"])["embedding"]
    assert emb.shape == (2, t.width)
    torch.testing.assert_close(emb, t.embed(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- students
def test_each_inherited_block_gives_the_teacher_blocks_output(pair):
    name, teacher, student, _ = pair
    drop = teacher.depth // 3
    torch.manual_seed(5)
    tokens = torch.randn(3, teacher.num_prefix_tokens + 7, teacher.width)
    for j, unit in enumerate(inherited_units(student)):
        with torch.no_grad():
            ours, _ = unit(tokens, None, None)
        torch.testing.assert_close(ours, teacher.run_block(drop + j, tokens), rtol=0, atol=1e-5)
    assert len(inherited_units(student)) == teacher.depth - drop


def test_the_students_pooling_and_head_equal_the_teachers_on_the_same_tokens(pair):
    """MAP head, mean of the patch tokens, class token; norm before or after pooling; projection."""
    name, teacher, student, _ = pair
    torch.manual_seed(6)
    tokens = torch.randn(3, teacher.num_prefix_tokens + 9, teacher.width)
    if teacher.num_prefix_tokens > int(teacher.has_class_token):  # registers: the student has none
        tokens = tokens[:, : 1 + 9]  # class token and patches (pooling reads nothing else)
        ref_tokens = torch.cat([tokens[:, :1], torch.zeros(3, teacher.num_prefix_tokens - 1, teacher.width),
                                tokens[:, 1:]], dim=1)
    else:
        ref_tokens = tokens
    with torch.no_grad():
        ours = student.forward_head(tokens)
    torch.testing.assert_close(ours, teacher.pool_norm_head(ref_tokens), rtol=0, atol=1e-5)


def test_the_student_is_built_as_its_teacher_is(pair):
    name, teacher, student, policy = pair
    cfg = student.config
    assert cfg.has_cls_token == teacher.has_class_token
    assert cfg.head_op == {"token": "cls", "avg": "avg", "map": "map"}[teacher.pool]
    latent = round(teacher.num_patches / 4) - int(teacher.has_class_token)
    assert cfg.num_latent_tokens == latent
    cc = cfg.compatible_config
    assert (cc.qk_norm, cc.mlp_layer, cc.head_dim) == (teacher.qk_norm, teacher.mlp_layer,
                                                       teacher.width // teacher.num_heads)
    # The focusing width: half the teacher's, a multiple of its head width and of 8.
    focus = cfg.width_configs[0]
    assert focus % cc.head_dim == 0 and focus % 8 == 0
    # The MAP head is inherited and frozen with the final norm (the default train_head=False).
    if teacher.pool == "map":
        assert all(n in policy.frozen for n, _ in student.attn_pool.named_parameters(prefix="attn_pool"))
    x = _images()
    with torch.no_grad():
        out = student(x)
        tokens = student.forward_tokens(x)
    assert out.shape == (2, teacher.embed_dim if teacher.target == "proj" else (teacher.num_classes or teacher.width))
    assert tokens.shape == (2, cfg.num_latent_tokens + int(cfg.has_cls_token), teacher.width)


def _meta_teacher(timm_name: str):
    """A real tower's architecture as a teacher, on the meta device (no weights, no memory)."""
    import timm

    from teachers.timm_vit import TimmTeacher

    with torch.device("meta"):
        vit = timm.create_model(timm_name)
    teacher = TimmTeacher.__new__(TimmTeacher)
    torch.nn.Module.__init__(teacher)
    teacher._init_tower(vit)
    teacher.preprocess = type("P", (), {"mean": (0.5,) * 3, "std": (0.5,) * 3})()
    teacher.head_state_dict = lambda: None
    return teacher


@pytest.mark.parametrize("recipe,tower,tokens,focus,head_dim,inherited", [
    ("siglip_base", "vit_base_patch16_siglip_224", 49, 384, 64, 8),
    ("siglip2_so400m", "vit_so400m_patch16_siglip_384", 144, 576, 72, 18),
])
def test_the_siglip_recipes_build_the_students_they_describe(recipe, tower, tokens, focus, head_dim, inherited):
    """The recipes' open_clip towers are these timm models (open_clip's configs say so); the students
    their comments promise: latent tokens only, the focusing width, the teacher's head width, the MAP head."""
    import open_clip

    from bootstrap.config import load_recipe

    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml", ["data.train=/data/train"])
    assert open_clip.get_model_config(r.teacher["model"])["vision_cfg"]["timm_model_name"] == tower
    cfg = student_config(_meta_teacher(tower), r.student)
    assert (cfg.num_latent_tokens, cfg.has_cls_token, cfg.head_op, cfg.width_configs[0]) == (tokens, False, "map",
                                                                                               focus)
    assert cfg.compatible_config.head_dim == head_dim and len(cfg.width_configs) == 2 + inherited
    assert cfg.proj_dim == 0  # SigLIP's tower has no projection: the MAP output is the embedding


def test_defaults_scale_the_released_construction_to_so400m():
    """SigLIP So400m/14 at 384 px, read on the meta device: 182 latent tokens (a quarter of 729), no class
    token, heads of 72, MLP 4304, the MAP head, focusing at 576 = 8 heads of 72."""
    cfg = student_config(_meta_teacher("vit_so400m_patch14_siglip_384"), BootstrapOptions())
    assert (cfg.num_latent_tokens, cfg.has_cls_token, cfg.head_op, cfg.width_configs[0]) == (182, False, "map", 576)
    assert cfg.compatible_config.head_dim == 72 and cfg.compatible_config.mlp_hidden_dim == 4304
    assert len(cfg.width_configs) == 2 + 18 and cfg.pool_spec["num_heads"] == 16
    with torch.device("meta"):
        from students import SparseFormer

        student = SparseFormer(cfg)
    assert student.attn_pool.mlp.fc1.out_features == 4304
    assert student.layers[-1].attn.num_heads == 16 and student.layers[-1].mlp.fc1.out_features == 4304


def test_student_configs_round_trip_with_the_new_keys():
    from students.sparseformer.config import SparseFormerConfig

    for name in ("timm:tiny_siglip_map", "timm:tiny_qknorm_swiglu_avg", "timm:tiny_dinov2_swiglu"):
        cfg = bootstrap_student(_teacher(name))[0].config
        again = SparseFormerConfig.from_json(cfg.to_json())
        assert again == cfg
    with pytest.raises(ValueError, match="mlp_layer must be one of"):
        SparseFormerConfig.from_dict({**cfg.to_dict(), "compatible_config": {
            **cfg.compatible_config.to_dict(), "mlp_layer": "swishglu"}})
    with pytest.raises(ValueError, match="head_op 'map' and pool_spec go together"):
        SparseFormerConfig.from_dict({**cfg.to_dict(), "head_op": "map"})


# ----------------------------------------------------------------------------- zero-shot and exports
def test_siglip_zero_shot_uses_the_sigmoid_logits_with_the_bias():
    from eval.zeroshot import zero_shot

    teacher = _teacher("openclip:siglip_map")
    torch.manual_seed(7)
    feats = {"teacher": torch.randn(6, teacher.embed_dim), "student": torch.randn(6, teacher.embed_dim),
             "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    result = zero_shot(feats, teacher, ["cat", "dog", "car"], templates=["a photo of a {}."])
    assert result["logits"] == {"kind": "sigmoid", "scale": pytest.approx(teacher.logit_scale), "bias": -10.0}
    with torch.no_grad():
        text = F.normalize(teacher.encode_text(teacher.tokenizer(["a photo of a cat.", "a photo of a dog.",
                                                                  "a photo of a car."])), dim=-1)
    logits = teacher.logit_scale * F.normalize(feats["student"], dim=-1) @ text.t() - 10.0
    assert result["top1_probability"]["student"] == pytest.approx(float(torch.sigmoid(logits.max(1).values).mean()),
                                                                 abs=1e-6)
    assert result["student"]["top1"] == pytest.approx(float((logits.argmax(1) == feats["labels"]).float().mean()))


@pytest.mark.parametrize("proj", ["none", "linear"])
def test_a_siglip_student_exports_to_openclip_with_its_logit_bias_and_reloads_offline(proj, tmp_path):
    import open_clip

    from students.export import export_openclip

    teacher = _teacher("openclip:siglip_map" if proj == "none" else "openclip:siglip_map_proj")
    student, _ = bootstrap_student(teacher)
    out = export_openclip(student.eval(), teacher, tmp_path / "oc")
    model = open_clip.create_model(f"local-dir:{out}").eval()
    assert float(model.logit_bias.detach()) == pytest.approx(-10.0)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), student(x), rtol=0, atol=1e-5)
    assert reload_offline(out, (32, 32))[0] == "-10.0"


def reload_offline(folder: Path, size: tuple[int, int]) -> list[str]:
    """An OpenCLIP export loaded by a fresh process without the network (`import students` registers the student
    tower): its logit bias and the shape of encode_image on one image of `size`, as printed words."""
    code = ("import students, open_clip, torch; m = open_clip.create_model('local-dir:%s').eval(); "
            "print(float(m.logit_bias), tuple(m.encode_image(torch.zeros(1, 3, %d, %d)).shape))" % (folder, *size))
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize("name", KINDS)
def test_students_of_every_new_kind_export_to_timm(name, tmp_path):
    import timm

    from students.export import export_timm

    student, _ = bootstrap_student(_teacher(f"timm:{name}"))
    out = export_timm(student.eval(), tmp_path / "timm")
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), student(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- what the message promises
SUPPORTED_TIMM = ["vit_base_patch16_siglip_224", "vit_so400m_patch14_siglip_384", "vit_giant_patch14_reg4_dinov2",
                  "vit_base_patch16_siglip_gap_224", "vit_large_patch16_384", "vit_base_patch14_dinov2"]
SUPPORTED_OPENCLIP = ["ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP-384", "ViT-B-16-SigLIP2",
                      "ViT-SO400M-16-SigLIP2-384", "vit_medium_patch16_gap_256", "ViT-B-16", "ViT-L-14-336"]
UNSUPPORTED_OPENCLIP = {"EVA02-E-14": "post-norm", "convnext_base": "CNN",
                        "ViTamin-B": "hybrid", "MobileCLIP-B": "hybrid", "RN50": "ModifiedResNet",
                        "coca_ViT-B-32": "CoCa"}


@pytest.mark.parametrize("name", SUPPORTED_TIMM)
def test_the_supported_timm_teachers_named_in_the_message_are_inheritable(name):
    import timm

    from teachers.timm_vit import structure_problems

    assert structure_problems(timm.create_model(name, device="meta")) == []


def test_the_openclip_teachers_named_in_the_message_are_what_it_says():
    import open_clip

    from teachers.openclip import config_problems

    for name in SUPPORTED_OPENCLIP:
        assert config_problems(open_clip.get_model_config(name)) == [], name
        assert name in SUPPORTED_TEACHERS or name.startswith("ViT-")
    for name, why in UNSUPPORTED_OPENCLIP.items():
        problems = config_problems(open_clip.get_model_config(name))
        assert problems and why in " ".join(problems), (name, problems)
    for word in ("SigLIP", "SwiGLU", "EVA-02", "ResNet", "hybrid", "MAP"):
        assert word in SUPPORTED_TEACHERS


# ----------------------------------------------------------------------------- the run
def test_a_siglip_teacher_bootstraps_end_to_end_and_exports(tmp_path):
    """`bootstrap/run.py` with an open_clip SigLIP teacher: the student has no class token and the MAP head,
    trains, and its OpenCLIP export keeps the teacher's text tower and logit bias."""
    import json

    import open_clip

    from test_bootstrap import run_tiny_teacher

    out = run_tiny_teacher(tmp_path, tiny_towers.openclip_spec("tiny_siglip_map"), {"tokens": 4, "focus_width": 72})
    cfg = json.loads((out / "student_config.json").read_text())
    assert cfg["head_op"] == "map" and cfg.get("cls_token_insert_layer", 0) == 0 and cfg["num_latent_tokens"] == 4
    exported = [p.parent for p in out.rglob("open_clip_config.json")]
    assert len(exported) == 1
    model = open_clip.create_model(f"local-dir:{exported[0]}")
    assert float(model.logit_bias.detach()) == pytest.approx(-10.0)
