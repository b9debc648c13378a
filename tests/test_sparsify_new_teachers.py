"""Sparsifiner students of the newer teacher kinds (issue 19): SigLIP's MAP head and no class token, average
pooling with `norm` or `fc_norm`, SwiGLU / packed GLU MLPs, LayerScale and registers, qk-norm, head widths
that are no multiple of 64 and MLP widths no ratio gives back; as timm teachers and as open_clip towers."""

import copy
import math
import warnings

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from bootstrap.config import LossConfig, OptimConfig
from students.sparsifiner.cost import attention_cost
from students.sparsifiner.pictures import kept_keys_figure
from students import ConfigError, Sparsifiner, SparsifinerConfig, sparsify
from students.export import export_openclip, export_timm
from students import family_named
from students.family import PhaseContext
from students.sparsifiner import SparsifinerOptions
from students.sparsifiner.timm_names import register_config, timm_name
from teachers import RandomTeacherWarning, create_teacher
from tiny_towers import TIMM_SPECS, openclip_spec

SMALL = dict(basis_coef_topk=2)  # 16 patches: K = N // 6 = 2 (no class token) or 3 (registers)
SPECS = {
    **TIMM_SPECS,
    # 2 heads of 14 and an MLP of 61: int(28 * (61 / 28)) is 60, so the exact width must travel.
    "odd_widths": {"kind": "timm", "model": "tiny_siglip_gap", "pretrained": None,
                   "model_kwargs": {"embed_dim": 28, "mlp_ratio": 61.5 / 28}},
    "openclip_siglip_map": openclip_spec("tiny_siglip_map"),
    "openclip_siglip_gap_proj": openclip_spec("tiny_siglip_gap", proj="linear"),
}


def make_teacher(name):
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        t = create_teacher(copy.deepcopy(SPECS[name]))
    with torch.no_grad():  # no weight agrees with a fresh model's by its initialisation
        for p in t.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return t


@pytest.fixture(scope="module", params=list(SPECS))
def teacher(request):
    return make_teacher(request.param)


def _images(teacher, n=2):
    return torch.randn(n, 3, *teacher.preprocess.size, generator=torch.Generator().manual_seed(4))


def _aligned(teacher, student, x):
    return student(x, pre_logits=teacher.target != "proj")


def test_the_student_is_the_teachers_tower_in_timm_names(teacher):
    student, _ = sparsify(teacher, **SMALL)
    cfg = student.config
    assert (cfg.class_token, cfg.global_pool, cfg.mlp_layer, cfg.qk_norm) == \
        (teacher.has_class_token, teacher.pool, teacher.mlp_layer, teacher.qk_norm)
    assert student.num_prefix_tokens == teacher.num_prefix_tokens
    assert cfg.fc_norm == (not teacher.norm_before_pool)
    assert cfg.hidden_dim == teacher.mlp_hidden_dim
    assert (student.attn_pool is not None) == (teacher.pool == "map")
    # The teacher's timm block keys are the student block's, predictor aside.
    own = {k.removeprefix("blocks.0.") for k in student.state_dict() if k.startswith("blocks.0.")}
    assert set(teacher.block_state_dict(0)) == {k for k in own if ".mask_predictor." not in k}


def test_keep_rate_one_is_the_teacher_exactly(teacher):
    student, _ = sparsify(teacher, keep_rate=1.0, **SMALL)
    student.eval()
    x = _images(teacher)
    pre_logits = teacher.target != "proj"
    with torch.no_grad():
        embed = teacher.embed(x)
        torch.testing.assert_close(_aligned(teacher, student, x), embed, rtol=0, atol=1e-5)
        d = student.forward_details(x)
        torch.testing.assert_close(d.pre_logits if pre_logits else d.output, embed, rtol=0, atol=1e-5)
        torch.testing.assert_close(d.tokens, teacher.final_tokens(x), rtol=0, atol=1e-5)
        for ours, theirs in zip(d.attn, teacher.attention_maps(x)):  # qk-norm included
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        for layer in (0, 2, -2, -1):
            torch.testing.assert_close(student.forward_tokens(x, layer=layer), teacher.forward_tokens(x, layer=layer),
                                       rtol=0, atol=1e-5)


def test_every_predicted_row_keeps_exactly_its_budget(teacher):
    student, _ = sparsify(teacher, **SMALL)
    n = teacher.num_prefix_tokens + teacher.num_patches
    budget = math.ceil(0.25 * n)
    assert student.budgets == [budget] * teacher.depth
    with torch.no_grad():
        d = student.eval().forward_details(_images(teacher))
    p = teacher.num_prefix_tokens
    for approx, mask in zip(d.approx_attn, d.attn_masks):
        assert approx.shape[2] == n - p  # every row but the prefix tokens' is predicted
        assert (mask[:, :, p:].sum(-1) == budget).all()
        assert mask[:, :, :p].all()
    if not teacher.has_class_token and p == 0:  # SigLIP: no row attends densely
        assert all((m.sum(-1) == budget).all() for m in d.attn_masks)


def test_output_shapes_and_the_pooled_output_reads_every_row(teacher):
    """forward's last-block shortcut (only the prefix rows) is for class-token pooling alone: with mean or MAP
    pooling forward must equal forward_details, which updates every row."""
    student, _ = sparsify(teacher, **SMALL)
    student.eval()
    x = _images(teacher, 3)
    n, p, c = teacher.num_prefix_tokens + teacher.num_patches, teacher.num_prefix_tokens, teacher.width
    with torch.no_grad():
        d = student.forward_details(x)
        out = student(x)
        pre, out2 = student.forward_outputs(x)
        tokens = student.forward_tokens(x, class_token=False)
    assert d.tokens.shape == (3, n, c) and d.patch_tokens.shape == (3, teacher.num_patches, c)
    assert d.pre_logits.shape == (3, c) and d.output.shape == out.shape == (3, student.config.output_dim)
    assert tokens.shape == (3, teacher.num_patches, c)
    heads = teacher.num_heads
    assert [a.shape for a in d.approx_attn] == [(3, heads, n - p, n)] * teacher.depth
    assert [m.shape for m in d.attn_masks] == [(3, heads, n, n)] * teacher.depth
    torch.testing.assert_close(out, d.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(out2, d.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(pre, d.pre_logits, rtol=0, atol=1e-6)
    if teacher.pool != "token":
        with pytest.raises(ValueError, match="reads every patch token"):
            student.forward_features(x, class_token_only=True)


def test_both_phases_run_a_training_step(teacher):
    """The run's phases (the family's `phases`) on the student: reconstruct trains the predictors on the teacher's maps
    (every query row without a class token), sparse the backbone on alignment + tokens (+ KL with a classifier)."""
    training = family_named("sparsifiner")
    options = SparsifinerOptions(keep_rate=0.25, **SMALL)
    torch.manual_seed(0)
    student, policy = training.build(teacher, options)
    phases = training.phases(PhaseContext(options, student, teacher, LossConfig(), OptimConfig()))
    assert [ph.name for ph in phases] == ["reconstruct", "sparse"]
    sparse_terms = [t.name for t in phases[1].terms]
    assert sparse_terms[:2] == ["align", "tokens"]
    assert ("kl" in sparse_terms) == (teacher.family == "supervised")
    x = _images(teacher)
    student.train()
    for phase in phases:
        training.enter(student, policy, phase)
        trainable = [p for p in student.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trainable]
        frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
        optimizer = torch.optim.SGD(trainable, lr=1e-2)
        out = training.forward(student, x, phase.outputs, teacher.target != "proj")
        target = teacher.targets(x, phase.needs)
        loss = sum(term.weight * term.fn(out, target) for term in phase.terms)
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
        assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
        if phase.name == "reconstruct":  # the loss compares every predicted row (all of them without prefix)
            assert out["approx_attn"][0].shape[2] == student.num_tokens - teacher.num_prefix_tokens


def test_timm_names_and_checkpoint_path_load_the_new_configs(teacher, tmp_path):
    student, _ = sparsify(teacher, **SMALL)
    student.eval()
    cfg = student.config
    assert SparsifinerConfig.from_json(cfg.to_json()) == cfg  # pool_spec and the rest survive JSON
    path = tmp_path / "w.safetensors"
    save_file({k: v.clone().contiguous() for k, v in student.state_dict().items()}, str(path))
    name = register_config(cfg)
    assert name == timm_name(cfg)
    x = _images(teacher)
    for model in (timm.create_model(name, checkpoint_path=str(path)),
                  timm.create_model("sparsifiner", config=cfg.to_dict(), checkpoint_path=str(path))):
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), student(x), rtol=0, atol=1e-6)
    assert timm.create_model(name, num_classes=0).global_pool == cfg.global_pool
    with pytest.raises(ValueError, match="pools with"):
        timm.create_model(name, global_pool="token" if cfg.global_pool != "token" else "avg")


def test_attention_cost_and_kept_keys_without_a_class_token(tmp_path):
    teacher = make_teacher("tiny_siglip_map")
    student, _ = sparsify(teacher, **SMALL)
    cfg = student.config
    assert (cfg.num_prefix_tokens, cfg.num_tokens) == (0, 16)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        d = student.eval().forward_details(images, attention=False)
    budget = math.ceil(0.25 * 16)
    cost = attention_cost(student, d.attn_masks)
    assert cost.density == [budget / 16] * 3  # no dense row
    assert attention_cost(cfg).density == cost.density
    # predictor of one block, 2 heads of 36, c = 18, K = 2, every one of the 16 rows predicted, top-2:
    pred = 2 * (2 * 16 * 36 * 18 + 18 * 16 * 2 + 16 * 18 * 2 + 16 * 2 * 16)
    assert cost.masked_macs[0] == round(cost.dense_macs * budget / 16) + pred
    path = kept_keys_figure(images, d.attn_masks, tmp_path / "kept.png", block=-1,
                            num_prefix=student.num_prefix_tokens)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("changes, message", [
    ({"class_token": False}, "global_pool 'token' pools the class token"),
    ({"global_pool": "max"}, "global_pool must be one of token, avg, map"),
    ({"pool_spec": {"num_heads": 2}}, "pool_spec describes a MAP head"),
    ({"global_pool": "map", "pool_spec": {"num_heads": 2}}, "exactly the keys"),
    ({"mlp_layer": "swiglu_packed"}, "mlp_layer must be one of"),
    ({"mlp_layer": "glu", "mlp_hidden_dim": 61}, "even hidden width"),
    ({"mlp_hidden_dim": 0}, "mlp_hidden_dim must be a positive integer"),
    ({"act": "relu"}, "act must be one of"),
])
def test_bad_new_config_keys_are_named(changes, message):
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ConfigError, match=message):
        SparsifinerConfig.from_dict({**base, **changes})


def test_exact_mlp_width_is_built():
    m = Sparsifiner(dict(img_size=32, patch_size=8, embed_dim=28, depth=1, num_heads=2, mlp_hidden_dim=61,
                         mlp_layer="swiglu", act="silu", qk_norm=True, class_token=False, global_pool="avg",
                         basis_coef_topk=2))
    assert m.blocks[0].mlp.fc1_g.out_features == 61 and m.blocks[0].mlp.fc2.in_features == 61
    assert isinstance(m.blocks[0].attn.q_norm, torch.nn.LayerNorm) and m.cls_token is None


@pytest.mark.parametrize("name", ["tiny_siglip_map", "tiny_qknorm_swiglu_avg"])
def test_timm_export_of_a_new_kind_reloads_with_equal_outputs(name, tmp_path):
    student, _ = sparsify(make_teacher(name), keep_rate=0.5, **SMALL)
    student.eval()
    out = export_timm(student, tmp_path / "timm")
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert reloaded.config == student.config and reloaded.global_pool == student.global_pool
    with torch.no_grad():
        assert torch.equal(reloaded(x), student(x))


@pytest.mark.parametrize("kind", ["openclip_siglip_gap_proj", "openclip_siglip_map"])
def test_openclip_export_of_a_siglip_student_keeps_the_logit_bias(kind, tmp_path):
    # mean-pooled with a linear projection; MAP-pooled without one (the tower's output is the embedding)
    teacher = make_teacher(kind)
    student, _ = sparsify(teacher, keep_rate=0.5, **SMALL)
    student.eval()
    out = export_openclip(student, teacher, tmp_path / "oc")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model.visual.trunk, Sparsifiner) and not model.visual.trunk.has_class_token
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), student(x), rtol=0, atol=1e-5)
    assert torch.equal(model.logit_bias, teacher.model.logit_bias)


def test_the_reports_kept_keys_picture_and_cost_without_a_class_token(tmp_path):
    from students import FAMILIES

    teacher = make_teacher("openclip_siglip_map")
    student, _ = sparsify(teacher, **SMALL)
    student.eval()
    images = torch.randn(2, 3, 32, 32)
    (picture,) = FAMILIES["sparsifiner"].pictures
    picture.draw(student, images, tmp_path / picture.file, teacher.preprocess.mean, teacher.preprocess.std)
    assert (tmp_path / picture.file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (section,) = FAMILIES["sparsifiner"].sections
    cost = section.measure(student, images)
    assert [b["density"] for b in cost["blocks"]] == [0.25] * 3  # 4 of 16 keys in every row, none dense


@pytest.mark.parametrize("name, tokens, hidden", [
    ("vit_so400m_patch14_siglip_384", 729, 4304),  # 384 px / 14 (the last 6 px dropped, as timm): 27 x 27
    ("vit_base_patch16_siglip_224", 196, 3072),
    ("vit_base_patch16_siglip_gap_224", 196, 3072),
    ("vit_giant_patch14_reg4_dinov2", 1374, 8192),  # packed SwiGLU, 4 registers
])
def test_the_real_towers_map_onto_the_student_key_for_key(name, tokens, hidden):
    """The real architectures (on the meta device, no weights): every teacher parameter has the student's name
    and shape, LayerScale aside (folded into the block weights)."""
    from students.sparsifiner.construct import SparsifyOptions, sparsifier_config
    from teachers.timm_vit import TimmTeacher

    model = timm.create_model(name, device="meta")
    cfg = sparsifier_config(TimmTeacher(model, name=name, spec={"kind": "timm", "model": name}), SparsifyOptions())
    assert (cfg.num_tokens, cfg.hidden_dim) == (tokens, hidden)
    with torch.device("meta"):
        student = Sparsifiner(cfg)
    theirs = {k: v.shape for k, v in model.state_dict().items() if ".ls1." not in k and ".ls2." not in k}
    ours = {k: v.shape for k, v in student.state_dict().items() if ".mask_predictor." not in k}
    assert ours == theirs
