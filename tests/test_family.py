"""The student-family interface: every family of the table fills it, and the run's optimizer asks the student
which parameters are exempt from weight decay (timm's `no_weight_decay()`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from bootstrap.config import LossConfig, OptimConfig
from bootstrap.stepper import TrainingForward, optimizer_param_groups
from conftest import GOLDEN, ROOT
from students import FAMILIES, SparseFormer, Sparsifiner, SparsifinerConfig, Student, family_of, student_from_config
from students.family import PhaseContext

TINY_SPARSIFINER = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                        reduce_n_factor=2, basis_coef_topk=2)


def _groups(student) -> tuple[set[str], set[str]]:
    """Names of the decayed and of the exempt trainable parameters, as the run's optimizer groups them."""
    module = TrainingForward(student, None, (), False)
    decay, no_decay = optimizer_param_groups(module, 0.05)
    names = {id(p): n.removeprefix("student.") for n, p in module.named_parameters()}
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def test_a_sparsifiner_s_position_embedding_and_prefix_tokens_get_no_weight_decay():
    """As timm's VisionTransformer.no_weight_decay() and the authors' optimizer: pos_embed, cls_token and the
    registers are exempt (the optimizer once decided by SparseFormer parameter names and decayed them)."""
    student = Sparsifiner(SparsifinerConfig(**TINY_SPARSIFINER, reg_tokens=2)).set_phase("sparse")
    decayed, exempt = _groups(student)
    assert {"pos_embed", "cls_token", "reg_token"} <= exempt
    assert "blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert all(n.endswith(".bias") or student.get_parameter(n).ndim <= 1 or n in ("pos_embed", "cls_token",
                                                                                 "reg_token") for n in exempt)


@pytest.mark.parametrize("name", ["tiny_btsp_clip", "tiny_v1", "tiny_btsp_augreg"])
def test_a_sparseformer_s_exemptions_are_its_rois_embeddings_norms_and_biases(name):
    """The same parameters as the rule the run applied before the family interface (RoIs, embeddings, 1-D
    parameters and biases): a resumed run's optimizer state keeps its groups."""
    student = SparseFormer(json.loads((GOLDEN / f"{name}.json").read_text())["config"])
    decayed, exempt = _groups(student)
    old_rule = {n for n, p in student.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or "initial_roi" in n
                or "embedding" in n or "roi_offset_bias" in n}
    assert exempt == old_rule and decayed == {n for n, _ in student.named_parameters()} - old_rule
    assert "initial_roi.weight" in exempt and "initial_embedding.weight" in exempt
    assert any("stage_embedding" in n for n in exempt) == student.config.compatible_config.use_stage_embedding


# A tiny CLIP teacher on which every family's default options build a student (64 px, 8-px patches: 64 patches).
TINY_TEACHER = {"kind": "openclip", "model": "tiny-family-clip", "pretrained": None, "model_cfg": {
    "embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}


@pytest.fixture(scope="module")
def tiny_teacher():
    import warnings

    from teachers import create_teacher

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomTeacherWarning
        return create_teacher(TINY_TEACHER)


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_every_family_fills_the_interface(family, tiny_teacher):
    """The same questions of every row of the table, through the interface alone: a student built from a teacher
    by the family's default options, its saved config rebuilding it, its outputs, tokens, hidden states, report
    description, transformers description and timm name."""
    built, policy = family.build(tiny_teacher, family.options())
    config = built.config
    student = student_from_config(json.loads(config.to_json()))
    student.load_state_dict(built.state_dict())
    assert type(student) is family.model and isinstance(student, Student) and family_of(student) is family
    assert family_of(json.loads(config.to_json())) is family and family_of(family.options()) is family
    assert family.timm.generic_name in timm.list_models(family.name)
    options, optim = family.options(), OptimConfig(steps=3, warmup_steps=1)
    phases = family.phases(PhaseContext(options, built, tiny_teacher, LossConfig(), optim))
    assert family.steps(options, optim) == sum(p.steps for p in phases) and isinstance(policy.summary(), str)
    for phase in phases:
        family.enter(built, policy, phase)
        outputs = family.forward(built.train(), torch.randn(2, 3, 64, 64), phase.outputs, False)
        assert set(phase.outputs) <= set(outputs) and any(p.requires_grad for p in built.parameters())
    assert isinstance(student.no_weight_decay(), set)
    description = family.vision.describe(config.to_dict())
    images = torch.randn(2, 3, 64, 64)
    student.eval()
    with torch.no_grad():
        encoding = family.vision.encode(student, images)
        pre, out = student.forward_outputs(images)
        torch.testing.assert_close(out, student(images))
        torch.testing.assert_close(out, built.eval()(images))
        torch.testing.assert_close(pre, student(images, pre_logits=True))
        states = student.forward_hidden_states(images)
        torch.testing.assert_close(student.forward_tokens(images, layer=-2), states[-2])
        student.forward_details(images)
    assert out.shape == (2, config.output_dim) and pre.shape == (2, config.embed_dim)
    assert len(encoding.hidden_states) == len(states) == description["num_hidden_layers"] + 1
    assert encoding.last_hidden_state.shape[1] == description["num_latent_tokens"] + int(description["class_token"])
    info = family.describe(student)
    assert {"latent_tokens", "cls_token", "tokens", "token_text"} <= set(info)


def test_import_students_alone_registers_every_family_with_timm_and_open_clip():
    """A fresh process that imports nothing but `students` (and timm) builds each family's named models."""
    code = ("import students, timm\n"
            "for name in ('sparseformer_btsp_openai_clip_base', 'sparsifiner_deit_small_patch16_224'):\n"
            "    print(type(timm.create_model(name, device='meta')).__name__)\n"
            "print(type(timm.create_model('budget', config={}, device='meta')).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["SparseFormer", "Sparsifiner", "BudgetViT"]


def test_every_family_s_exports_and_named_models_load_in_a_fresh_process_that_imports_only_students(
        tiny_teacher, tmp_path):
    """As a user would, after `import students` alone: each family's OpenCLIP `local-dir:` and timm `local-dir:`
    exports reload and give the student's output, and every registered name builds (a family whose timm names
    were registered only by a module the tests import themselves once failed here with "Unknown model")."""
    from safetensors.torch import save_file

    from students.export import export_openclip, export_timm

    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    expected, folders = {"images": images}, {}
    for name, family in FAMILIES.items():
        student = family.build(tiny_teacher, family.options())[0].eval()
        folders[name] = (export_openclip(student, tiny_teacher, tmp_path / name / "oc"),
                         export_timm(student, tmp_path / name / "timm"))
        with torch.no_grad():
            expected[name] = student(images)
    save_file(expected, str(tmp_path / "expected.safetensors"))
    code = f"""
import students, open_clip, timm, torch
from safetensors.torch import load_file
torch.set_num_threads({torch.get_num_threads()})
e = load_file({str(tmp_path / 'expected.safetensors')!r})
for name, (oc, tm) in {({k: (str(a), str(b)) for k, (a, b) in folders.items()})!r}.items():
    clip = open_clip.create_model(f"local-dir:{{oc}}").eval()
    model = timm.create_model(f"local-dir:{{tm}}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(e["images"]), e[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(e["images"]), e[name], rtol=0, atol=1e-6)
    print("reloaded", name)
names = [m for m in timm.list_models() if m.split("_")[0] in ("sparseformer", "sparsifiner", "budget")]
for m in names:
    if m not in ("sparseformer", "sparsifiner", "budget"):
        timm.create_model(m, device="meta")
print("names:", *names)
print(len(names), "names")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("reloaded")] == \
        [f"reloaded {name}" for name in FAMILIES]
    # Every name this process knows, but for the names by content hash that other tests registered here, and
    # one hash name per export.
    hashed = set().union(*(f.timm._registered for f in FAMILIES.values()))
    known = {m for m in timm.list_models() if m.split("_")[0] in FAMILIES and m not in hashed}
    fresh = set(next(line for line in proc.stdout.splitlines() if line.startswith("names:")).split()[1:])
    assert known <= fresh and len(fresh - known) == len(FAMILIES)
    assert proc.stdout.splitlines()[-1] == f"{len(fresh)} names"
