"""Students of teachers with rotary position embeddings (issue 28): SparseFormer students whose inherited blocks keep
the teacher's rotary attention, a latent token turning by its RoI's centre on the teacher's patch grid; Sparsifiner
students of `Eva` towers; their configs, exports (OpenCLIP, timm, transformers), recipes and an end-to-end run.

The teachers are the tiny random towers of `tiny_towers` (`EVA_TOWERS`: 32 x 48 px, a 4 x 6 patch grid, 3 blocks),
one of each rotary kind ('cat' as PE-Core and EVA-02 CLIP, 'dinov3', 'mixed'), weights perturbed so that a tensor not
copied shows.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from students import SparseFormer, sparsify
from students.sparseformer.config import SparseFormerConfig
from students.sparseformer.construct import bootstrap_student, inherited_units
import tiny_towers
from test_new_teachers import reload_offline
from test_rope_teachers import SPECS, _images, _teacher  # the tiny towers of each kind, weights perturbed

ROOT = Path(__file__).resolve().parents[1]
ROTARY = sorted(k for k in SPECS if not k.endswith("plain"))
# Towers without registers: a student (which has none) given the teacher's tokens is then the teacher.
NO_REGISTERS = [k for k in ROTARY if "dinov3" not in k]


@functools.lru_cache(maxsize=None)  # tests that change a student copy it first
def _student(name: str, **options) -> SparseFormer:
    torch.manual_seed(1)
    return bootstrap_student(_teacher(name), **options)[0].eval()


def _patch_rois(teacher) -> torch.Tensor:
    """[N, 4] RoIs (x1, y1, x2, y2, normalised) that are exactly the teacher's patches, in token order."""
    h, w = teacher.grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten().float(), cols.flatten().float()
    return torch.stack([cols / w, rows / h, (cols + 1) / w, (rows + 1) / h], dim=-1)


def _with_registers(rope: torch.Tensor, registers: int) -> torch.Tensor:
    """Rotations with `registers` unrotated rows in front (sin 0, cos 1: the identity), so that a student block,
    whose only prefix token is the class token, runs on a teacher's token set with registers as the teacher does."""
    if not registers:
        return rope
    half = rope.shape[-1] // 2
    identity = torch.cat([torch.zeros(half), torch.ones(half)]).expand(*rope.shape[:-2], registers, -1)
    return torch.cat([identity, rope], dim=-2)


# ----------------------------------------------------------------------------- the design, where it is exact
@pytest.mark.parametrize("name", ROTARY)
def test_a_latent_token_whose_roi_is_a_patch_gets_that_patchs_rotation(name):
    t, student = _teacher(name), _student(name)
    drop = t.depth // 3
    rotations = student.block_rotations(_patch_rois(t)[None])
    assert len(rotations) == student.num_blocks == t.depth - drop
    grid = t.rope.grid_positions()
    for j, ours in enumerate(rotations):
        theirs = t.rope.rotations(grid, drop + j)  # the teacher's own grid rotations (bit for bit, teachers' tests)
        torch.testing.assert_close(ours[0], theirs if t.rope.per_block else theirs[None], rtol=0, atol=1e-6)
    if t.rope.per_block:  # RoPE-Mixed: each student block turns as the teacher block it came from, not as another
        assert not torch.allclose(rotations[0], rotations[1], atol=1e-3)


@pytest.mark.parametrize("name", ROTARY)
def test_each_inherited_block_is_the_teachers_block_on_the_patches_and_anywhere(name):
    """Latent tokens placed on the patch centres with the patch features give the teacher block's output; so do
    tokens at any RoIs, against the teacher's block at the RoI centres (`run_block(positions=)`)."""
    t, student = _teacher(name), _student(name)
    drop, registers = t.depth // 3, t.num_prefix_tokens - 1
    torch.manual_seed(5)
    tokens = torch.randn(2, t.num_prefix_tokens + t.num_patches, t.width)
    on_patches = student.block_rotations(_patch_rois(t)[None].expand(2, -1, -1))
    centres = torch.rand(2, 7, 2)
    rois = torch.cat([centres - 0.1, centres + 0.15], dim=-1)  # 7 latent tokens per image, RoIs off the grid
    anywhere = student.block_rotations(rois)
    latents = torch.randn(2, t.num_prefix_tokens + 7, t.width)
    positions = t.rope.from_image((rois[..., :2] + rois[..., 2:]) / 2)
    with torch.no_grad():
        for j, unit in enumerate(inherited_units(student)):
            ours = unit(tokens, None, None, rope=_with_registers(on_patches[j], registers))[0]
            torch.testing.assert_close(ours, t.run_block(drop + j, tokens), rtol=0, atol=1e-5)
            ours = unit(latents, None, None, rope=_with_registers(anywhere[j], registers))[0]
            torch.testing.assert_close(ours, t.run_block(drop + j, latents, positions=positions), rtol=0, atol=1e-5)
            # The class token's update alone (the last block of a class-token head) is the same row.
            cls = unit.forward_class_token(latents, _with_registers(anywhere[j], registers))
            torch.testing.assert_close(cls, ours[:, :1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NO_REGISTERS)
def test_a_student_given_the_teachers_tokens_on_the_patches_is_the_teacher(name):
    """The whole inherited path: a student with one latent token per patch, its RoIs on the patches and the
    teacher's tokens entering its first inherited block (as the sampling unit's output) computes the teacher's
    hidden states block by block, and its head (MAP head over the class token too, mean, class token; final norm;
    projection) gives the teacher's output, through `forward` (the class token alone in the last block) too."""
    t = _teacher(name)
    drop = t.depth // 3
    student = copy.deepcopy(_student(name, tokens=t.num_patches + 1))
    x = _images(1)
    entering = t.forward_tokens(x, layer=drop)
    with torch.no_grad():
        student.cls_embedding.weight.copy_(entering[0, :1])
    sampling_unit = student.layers[student.unit_layer_index[1]]
    hook = sampling_unit.register_forward_hook(lambda m, args, out: (entering[:, 1:], _patch_rois(t)[None]))
    try:
        with torch.no_grad():
            states = student.forward_hidden_states(x)
            outputs = [student(x), student.forward_details(x).output]
    finally:
        hook.remove()
    for k, state in enumerate(states):
        torch.testing.assert_close(state, t.forward_tokens(x, layer=drop + k), rtol=0, atol=1e-5)
    theirs = t.embed(x) if t.target == "proj" else t.pool_norm_head(t.forward_tokens(x, layer=t.depth))
    for ours in outputs:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_students_head_is_the_teachers_head(name):
    """Final norm, pooling (PE-Core's MAP head reads the class token too) and projection on the same tokens."""
    t, student = _teacher(name), _student(name)
    tokens = torch.randn(3, 1 + 9, t.width, generator=torch.Generator().manual_seed(6))  # class token + latents
    registers = torch.zeros(3, t.num_prefix_tokens - 1, t.width)  # the student has none; pooling reads none
    with torch.no_grad():
        ours = student.forward_head(tokens)
        theirs = t.pool_norm_head(torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert student.config.pool_include_prefix == t.pool_include_prefix


# ----------------------------------------------------------------------------- the student as a model
EXPECTED = {  # rope kind, attn norm, mlp norm, head op, pool over the class token too, learned rotary weights
    "timm:tiny_pe_core": ("cat", False, False, "map", True, False),
    "timm:tiny_eva02_clip": ("cat", True, True, "cls", False, False),
    "timm:tiny_dinov3": ("dinov3", False, False, "avg", False, False),
    "timm:tiny_rope_mixed": ("mixed", False, False, "avg", False, True),
    "openclip:pe_core": ("cat", False, False, "map", True, False),
    "openclip:eva02_clip": ("cat", True, True, "cls", False, False),
}


@pytest.mark.parametrize("name", ROTARY)
def test_a_rotary_student_is_its_config_and_weights(name):
    """The config carries the teacher's rotary module as data and round-trips through JSON; a student built from
    it and loaded strictly from the weights computes the same; RoPE-Mixed's frequencies are weights, frozen."""
    t = _teacher(name)
    student, policy = bootstrap_student(t)
    cfg = student.config
    cc = cfg.compatible_config
    assert (cfg.rope["kind"], cc.attn_norm, cc.mlp_norm, cfg.head_op, cfg.pool_include_prefix,
            "rope.freqs" in student.state_dict()) == EXPECTED[name]
    assert cfg.rope == t.rope.spec() and SparseFormerConfig.from_json(cfg.to_json()) == cfg
    again = SparseFormer(SparseFormerConfig.from_json(cfg.to_json()))
    again.load_state_dict(student.state_dict(), strict=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), student.eval()(x), rtol=0, atol=0)
    assert all(name in policy.frozen for name, _ in student.named_parameters() if name.startswith("rope."))
    if t.rope.per_block:
        assert torch.equal(student.rope.freqs, t.rope.module.freqs[:, t.depth // 3:])


def test_configs_without_the_new_keys_keep_their_json_and_timm_names():
    """The keys for rotary teachers stay out of a config's JSON at their defaults, so released and earlier configs
    round-trip as written and keep their timm hash names (pinned: computed before the keys existed)."""
    from students.sparseformer.released import RELEASED, btsp_config
    from students.sparseformer.timm_names import config_hash
    from students.sparsifiner.config import SparsifinerConfig
    from students.sparsifiner.timm_names import config_hash as sparsifiner_hash

    for name, (cfg, _) in RELEASED.items():
        assert SparseFormerConfig.from_dict(cfg).to_dict() == cfg, name
    cfg = SparseFormerConfig.from_dict(btsp_config(None, 16, 64, 128, 2, 10, True, False))
    cfg.compatible_config.qk_norm = True
    assert not {"rope", "pool_include_prefix"} & set(cfg.to_dict())
    assert not {"attn_norm", "mlp_norm"} & set(cfg.to_dict()["compatible_config"])
    assert config_hash(cfg) == "48ac22e5a30a"
    plain = SparsifinerConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    assert sparsifiner_hash(plain) == "c165adf71f00"


def test_bad_rotary_configs_and_calls_are_refused_in_one_line():
    from students import ConfigError, MediaSparseFormer

    student = _student("timm:tiny_pe_core")
    d = student.config.to_dict()
    for rope, match in (({**d["rope"], "kind": "mrope"}, "'kind' is one of"),
                        ({**d["rope"], "spin": 1}, "unknown \\['spin'\\]"),
                        ({**d["rope"], "grid_size": [4]}, "grid_size is \\[rows, cols\\]")):
        with pytest.raises(ConfigError, match=match) as err:
            SparseFormerConfig.from_dict({**d, "rope": rope})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="pool_include_prefix"):
        SparseFormerConfig.from_dict({**_student("timm:tiny_eva02_clip").config.to_dict(), "pool_include_prefix": True})
    unit = inherited_units(student)[0]
    with pytest.raises(ValueError, match="pass rope="):  # never silently unrotated
        unit(torch.zeros(1, 3, 48), None, None)
    with pytest.raises(ValueError, match="a video SparseFormer|MediaSparseFormer cannot hold rotary"):
        MediaSparseFormer(student.config)


# ----------------------------------------------------------------------------- Sparsifiner
@pytest.mark.parametrize("name", ROTARY)
def test_a_sparsifiner_of_a_rotary_tower_at_keep_rate_one_is_the_teacher(name):
    """Its stem (no position embedding for DINOv3), rotary blocks and head give the teacher's output and attention
    maps; the predictor reads the rotated q and k, the attention's own."""
    t = _teacher(name)
    student, policy = sparsify(t, keep_rate=1.0, basis_coef_topk=2)
    student.eval()
    assert student.config.rope == t.rope.spec() and student.config.pos_embed == (t.vit.pos_embed is not None)
    assert student.pos_embed is None if t.vit.pos_embed is None else student.pos_embed.shape == t.vit.pos_embed.shape
    x = _images()
    seen = []  # the q and k each block's predictor reads
    original = type(student.blocks[0].attn.mask_predictor).coefficients

    def spy(self, q, k, num_prefix):
        seen.append((q, k))
        return original(self, q, k, num_prefix)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(student.blocks[0].attn.mask_predictor), "coefficients", spy)
        details = student.forward_details(x)
    with torch.no_grad():
        out = student(x)
        maps = t.attention_maps(x)
        hidden = [t.forward_tokens(x, layer=i) for i in range(t.depth)]
    torch.testing.assert_close(out if t.target == "proj" else student(x, pre_logits=True), t.embed(x), rtol=0,
                               atol=1e-5)
    for ours, theirs in zip(details.attn, maps):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for i, (q, k) in enumerate(seen):
        tq, tk = t.block_modules(i).qk(hidden[i])
        torch.testing.assert_close(q, tq, rtol=0, atol=1e-5)
        torch.testing.assert_close(k, tk, rtol=0, atol=1e-5)
    assert len(seen) == t.depth
    assert all(n in policy["sparse"].frozen for n, _ in student.named_parameters() if n.startswith("rope."))


def test_a_sparse_rotary_sparsifiner_trains_and_reloads_from_its_config():
    from students.sparsifiner.config import SparsifinerConfig
    from students.sparsifiner.model import Sparsifiner

    t = _teacher("timm:tiny_rope_mixed")
    student, policy = sparsify(t, keep_rate=0.5, basis_coef_topk=2)
    policy.apply(student, "sparse")
    student.set_phase("sparse").train()
    x = _images()
    student(x).pow(2).mean().backward()  # the masked attention with rotations runs with gradients
    assert student.blocks[0].attn.qkv.weight.grad is not None and student.rope.freqs.grad is None
    again = Sparsifiner(SparsifinerConfig.from_json(student.config.to_json()))
    again.load_state_dict(student.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), student.eval()(x), rtol=0, atol=0)
    assert torch.equal(again.rope.freqs, t.rope.module.freqs)


# ----------------------------------------------------------------------------- evaluation and export
def test_a_rotary_student_exports_to_openclip_keeps_the_logits_and_reloads_offline(tmp_path):
    """PE-Core-like (MAP head over the class token, projection) and EVA-02-CLIP-like (logit bias): the OpenCLIP
    folder's encode_image is the student's, and its zero-shot logits use the teacher's logit scale and bias."""
    import open_clip

    from students.export import export_openclip

    texts = ["a photo of a cat.", "a photo of a dog."]
    x = _images()
    for name in ("openclip:pe_core", "openclip:eva02_clip"):
        t, student = _teacher(name), _student(name)
        out = export_openclip(student, t, tmp_path / name.split(":")[1])
        model = open_clip.create_model(f"local-dir:{out}").eval()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(x), student(x), rtol=0, atol=1e-5)
            logits = model.get_logits(x, t.tokenizer(texts))[0]
            ours = t.logit_scale * F.normalize(student(x), dim=-1) @ F.normalize(
                t.encode_text(t.tokenizer(texts)), dim=-1).t() + (t.logit_bias or 0.0)
        torch.testing.assert_close(logits, ours, rtol=0, atol=1e-4)
    # A fresh process without the network: `import students` registers the rotary student's tower.
    assert reload_offline(out, tiny_towers.EVA_IMAGE_SIZE) == ["-10.0", "(1,", "40)"]


@pytest.mark.parametrize("name", ["timm:tiny_pe_core", "timm:tiny_dinov3", "timm:tiny_rope_mixed"])
def test_rotary_students_export_to_timm(name, tmp_path):
    import timm

    from students.export import export_timm

    x = _images()
    for student in (_student(name), sparsify(_teacher(name), keep_rate=0.5, basis_coef_topk=2)[0].eval()):
        out = export_timm(student, tmp_path / type(student).__name__)  # reloads and compares
        reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), student(x), rtol=0, atol=1e-6)


def test_rotary_students_are_transformers_vision_towers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the [mllm] extra (transformers) is not installed")
    import students.transformers_model as stm

    x = _images()
    for student in (_student("openclip:pe_core"), sparsify(_teacher("timm:tiny_dinov3"), keep_rate=0.5,
                                                            basis_coef_topk=2)[0].eval()):
        vision = stm.StudentVisionModel.from_student(student, teacher=SPECS["openclip:pe_core"])
        vision.save_pretrained(tmp_path / type(student).__name__)
        again = transformers.AutoModel.from_pretrained(tmp_path / type(student).__name__).eval()
        with torch.no_grad():
            ours = again(x, output_hidden_states=True)
            states = student.forward_hidden_states(x)
        torch.testing.assert_close(ours.pooler_output, student(x, pre_logits=True), rtol=0, atol=1e-6)
        assert len(ours.hidden_states) == len(states)
        for a, b in zip(ours.hidden_states, states):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- recipes, on the real towers
def _meta_openclip_teacher(model: str):
    import math

    import open_clip

    from teachers.openclip import OpenClipEvaTeacher

    cfg = open_clip.get_model_config(model)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(model, pretrained=None, device="meta")
    clip.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return OpenClipEvaTeacher(clip, name=model, spec={"kind": "openclip", "model": model, "pretrained": None},
                              tokenizer_name=model, model_cfg=cfg)


def _meta_timm_teacher(model: str):
    import timm

    from teachers.timm_vit import TimmEvaTeacher

    return TimmEvaTeacher(timm.create_model(model, device="meta"), name=model,
                          spec={"kind": "timm", "model": model, "pretrained": None})


@pytest.mark.parametrize("recipe,latent,size,grid,kind,inherited,head", [
    ("pe_core_large", 144, (336, 336), (24, 24), "cat", 16, "map"),
    ("dinov3_base", 63, (256, 256), (16, 16), "dinov3", 8, "avg"),
])
def test_the_rotary_recipes_build_the_students_they_describe(recipe, latent, size, grid, kind, inherited, head):
    """The recipes' real towers, read on the meta device, and the student each recipe describes (built on meta):
    its latent tokens and class token, the teacher's resolution, grid and rotary kind, its blocks and head; with
    the rotary buffers computed, its rotations at the patch centres are the teacher's."""
    from bootstrap.config import load_recipe

    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml", ["data.train=/data/train"])
    spec = r.teacher
    t = _meta_openclip_teacher(spec["model"]) if spec["kind"] == "openclip" else \
        _meta_timm_teacher(spec["model"].split(".")[0])
    assert t.preprocess.size == size and t.rope.grid_size == grid and t.rope.kind == kind
    with torch.device("meta"):
        student, _ = bootstrap_student(t, options=r.student)
    cfg = student.config
    assert (cfg.num_latent_tokens, cfg.has_cls_token, student.num_blocks, cfg.head_op) == (latent, True, inherited,
                                                                                         head)
    assert cfg.rope == t.rope.spec() and cfg.pool_include_prefix == (recipe == "pe_core_large")
    assert student.pretrained_cfg["input_size"] == (3, *size)
    if recipe == "pe_core_large":
        assert cfg.proj_dim == 1024 and cfg.width_configs[0] == 512 and t.embed_dim == 1024
    for rotary in (t.rope, student.rotary):  # the rotary buffers, computed on the CPU (the rest stays on meta)
        rotary.module.to_empty(device="cpu")
        rotary.module.init_non_persistent_buffers()
    h, w = grid
    rois = torch.stack([torch.arange(h * w) % w / w, torch.arange(h * w) // w / h,
                        (torch.arange(h * w) % w + 1) / w, (torch.arange(h * w) // w + 1) / h], dim=-1)
    torch.testing.assert_close(student.block_rotations(rois[None])[0][0, 0], t.rope.grid_rotations(), rtol=0,
                               atol=1e-5)


# ----------------------------------------------------------------------------- the run
@pytest.mark.slow
def test_a_pe_core_like_teacher_bootstraps_end_to_end_and_its_export_reloads(tmp_path):
    """`bootstrap/run.py` with a tiny PE-Core-like open_clip teacher (rotary 'cat' positions, the MAP head over the
    class token, the projection): the student trains, and its OpenCLIP export reloads with encode_image equal to
    the trained student's."""
    import open_clip

    from students.run_folder import RunFolder
    from test_bootstrap import run_tiny_teacher

    out = run_tiny_teacher(tmp_path, SPECS["openclip:pe_core"], {"tokens": 7, "focus_width": 24}, image_size=48)
    cfg = json.loads((out / "student_config.json").read_text())
    assert cfg["rope"]["kind"] == "cat" and cfg["pool_include_prefix"] and cfg["num_latent_tokens"] == 6
    student = RunFolder(out).load_student().eval()
    exported = [p.parent for p in out.rglob("open_clip_config.json")]
    assert len(exported) == 1
    model = open_clip.create_model(f"local-dir:{exported[0]}").eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), student(x), rtol=0, atol=1e-5)
