"""Students back into timm and OpenCLIP: registration, exports, and round trips that compare outputs."""

import json
import os
import subprocess
import sys
import warnings

import open_clip
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import students
from conftest import GOLDEN, ROOT
from students import SparseFormerConfig, get_config, get_pretrained_cfg
from students.sparseformer.construct import bootstrap_student
from students.export import ExportError, export_openclip, export_run, export_timm, main
from students.sparseformer.timm_names import CONFIG_FILE, HASH_PREFIX, config_hash, released_name, timm_name
from teachers import create_teacher

RELEASED = json.loads((GOLDEN / "released_configs.json").read_text())
GOLDEN_CASE = json.loads((GOLDEN / "tiny_btsp_clip.json").read_text())

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 64, "num_heads": 2, "num_classes": 10}
CLASSNAMES = ["cat", "dog", "sparse token"]
TEMPLATES = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of a {c}."]


def _randomise(module: torch.nn.Module) -> None:
    """Random values everywhere, so that no weight agrees with a fresh model's by its initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _teacher(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weight teachers warn, on purpose
        teacher = create_teacher(spec)
    _randomise(teacher.model)
    return teacher


def _clip_spec(pretrained=None):
    return {"kind": "openclip", "model": "tiny-clip", "model_cfg": TINY_CLIP_CFG, "pretrained": pretrained}


@pytest.fixture(scope="module")
def clip_pair():
    torch.manual_seed(1)
    teacher = _teacher(_clip_spec())
    student, _ = bootstrap_student(teacher)
    _randomise(student)
    return teacher, student.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------
# timm registration
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RELEASED))
def test_released_names_build_in_timm_with_released_keys_and_pretrained_cfg(name):
    model = timm.create_model(name, pretrained=False, device="meta")
    assert isinstance(model, students.SparseFormer)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == RELEASED[name]["state_dict"]
    expected = get_pretrained_cfg(name)
    for cfg in (model.pretrained_cfg, timm.get_pretrained_cfg(name).to_dict()):
        assert tuple(cfg["input_size"]) == expected.input_size
        assert tuple(cfg["mean"]) == expected.mean and tuple(cfg["std"]) == expected.std
        assert cfg["interpolation"] == expected.interpolation and cfg["crop_pct"] == expected.crop_pct
        assert cfg["num_classes"] == get_config(name).proj_dim
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["mean"] == expected.mean and data_cfg["input_size"] == expected.input_size


@pytest.mark.slow
def test_released_weights_load_strictly_by_checkpoint_path_and_export_under_their_name(tmp_path):
    name = "sparseformer_v1_tiny"  # the smallest released model (31M parameters)
    source = timm.create_model(name)
    _randomise(source)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    by_path = timm.create_model(name, checkpoint_path=str(path))  # timm loads it with strict=True
    for k, v in source.state_dict().items():
        assert torch.equal(by_path.state_dict()[k], v), k
    # A released architecture exports under its own name; export_timm reloads the folder
    # (pretrained_cfg file = the folder) and compares outputs.
    out = export_timm(source.eval(), tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and "model_args" not in config


def test_golden_checkpoint_through_timm_reproduces_the_reference_output(tmp_path):
    weights = str(GOLDEN / "tiny_btsp_clip.state_dict.safetensors")
    io = {k: v.float() for k, v in load_file(GOLDEN / "tiny_btsp_clip.io.safetensors").items()}
    config = GOLDEN_CASE["config"]
    by_file = timm.create_model("sparseformer", config=config, pretrained=True,
                                pretrained_cfg_overlay=dict(file=weights)).eval()
    by_path = timm.create_model("sparseformer", config=config, checkpoint_path=weights).eval()
    with torch.no_grad():
        out_file, out_path = by_file(io["input"]), by_path(io["input"])
    assert torch.equal(out_file, out_path)
    torch.testing.assert_close(out_file, io["output"], rtol=1e-5, atol=1e-5)


def test_timm_keyword_arguments():
    config = GOLDEN_CASE["config"]
    weights = str(GOLDEN / "tiny_btsp_clip.state_dict.safetensors")
    x = torch.randn(2, 3, 48, 48)
    full = timm.create_model("sparseformer", config=config, checkpoint_path=weights).eval()
    features = timm.create_model("sparseformer", config=config, num_classes=0, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=weights)).eval()
    with torch.no_grad():
        torch.testing.assert_close(features(x), full(x, pre_logits=True), rtol=0, atol=0)
    new_head = timm.create_model("sparseformer", config=config, num_classes=7, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=weights))
    assert new_head.proj.out_features == 7  # timm drops a classifier of another width, keeps the rest
    assert torch.equal(new_head.norm.weight, full.norm.weight)
    assert timm.create_model("sparseformer", config=config, global_pool="avg").config.head_op == "avg"
    assert timm.create_model("sparseformer", config=config, drop_path_rate=0.1).config.drop_path_rate == 0.1


def test_timm_errors_name_the_fix():
    with pytest.raises(RuntimeError, match="pretrained_cfg_overlay=dict\\(file=PATH\\)"):
        timm.create_model("sparseformer_v1_tiny", pretrained=True, device="meta")
    with pytest.raises(ValueError, match="in_chans=3"):
        timm.create_model("sparseformer_v1_tiny", in_chans=1, device="meta")
    with pytest.raises(TypeError, match="patch_drop_rate"):
        timm.create_model("sparseformer_v1_tiny", patch_drop_rate=0.1, device="meta")
    with pytest.raises(TypeError, match="config="):
        timm.create_model("sparseformer")


def test_timm_names_are_released_names_or_stable_hashes():
    for name in RELEASED:
        cfg = get_config(name)
        assert released_name(cfg) == timm_name(cfg) == name
        assert timm_name(cfg.replace(drop_path_rate=0.3, model_type=None)) == name  # training-only fields
    other = get_config("sparseformer_btsp_openai_clip_base").replace(num_latent_tokens=32)
    assert released_name(other) is None
    assert timm_name(other) == HASH_PREFIX + config_hash(other.to_dict()) == timm_name(SparseFormerConfig.from_json(other.to_json()))
    assert timm_name(other) != timm_name(other.replace(proj_dim=256))


# --------------------------------------------------------------------------
# OpenCLIP
# --------------------------------------------------------------------------
def test_openclip_export_reloads_with_student_images_and_teacher_text(tmp_path, clip_pair, images):
    teacher, student = clip_pair
    out = export_openclip(student, teacher, tmp_path / "oc")
    assert {p.name for p in out.iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors", CONFIG_FILE}
    assert SparseFormerConfig.from_json(str(out / CONFIG_FILE)).to_dict() == student.config.to_dict()

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    # Frozen like the teacher: torch's MultiheadAttention takes its fused path only when no parameter
    # requires grad, which changes the text features by ~1e-6 (float rounding, not the weights).
    model.eval().requires_grad_(False)
    assert model.visual.trunk.__class__ is students.SparseFormer
    assert torch.equal(model.visual.head.proj.weight, student.proj.weight)
    tokens = tokenizer(["a photo of a cat", "a sparse former"])
    assert torch.equal(tokens, teacher.tokenizer(["a photo of a cat", "a sparse former"]))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), student(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(tokens), teacher.encode_text(tokens), rtol=0, atol=1e-6)
    assert model.logit_scale.item() == teacher.model.logit_scale.item()
    # open_clip's preprocessing is the student's
    pp = model.visual.preprocess_cfg
    assert tuple(pp["mean"]) == tuple(student.pretrained_cfg["mean"]) and pp["size"] == (32, 32)
    norm = preprocess.transforms[-1]
    assert tuple(norm.mean) == tuple(student.pretrained_cfg["mean"]) and tuple(norm.std) == tuple(
        student.pretrained_cfg["std"])

    # zero-shot with open_clip's own helper: the same classifier as the teacher's text tower gives
    with torch.no_grad():
        ours = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, use_tqdm=False)
        theirs = open_clip.build_zero_shot_classifier(teacher.model, teacher.tokenizer, CLASSNAMES, TEMPLATES,
                                                      use_tqdm=False)
    assert ours.shape == (TINY_CLIP_CFG["embed_dim"], len(CLASSNAMES))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_openclip_export_accepts_a_plain_clip_with_its_config(tmp_path, clip_pair, images):
    teacher, student = clip_pair
    with pytest.raises(ValueError, match="model_cfg="):
        export_openclip(student, teacher.model, tmp_path / "no_cfg")
    out = export_openclip(student, teacher.model, tmp_path / "plain", model_cfg=TINY_CLIP_CFG)
    model = open_clip.create_model(f"local-dir:{out}").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), student(images), rtol=0, atol=1e-6)


def test_openclip_export_refuses_a_student_of_another_teacher(tmp_path, clip_pair):
    teacher, _ = clip_pair
    timm_teacher = _teacher({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                             "model_kwargs": TINY_VIT_KWARGS})
    other, _ = bootstrap_student(timm_teacher)
    with pytest.raises(ExportError, match="bootstrapped from this CLIP teacher"):
        export_openclip(other, teacher, tmp_path / "x")


def test_openclip_folder_with_a_mismatched_config_is_refused(tmp_path, clip_pair):
    teacher, student = clip_pair
    out = export_openclip(student, teacher, tmp_path / "oc", verify=False)
    edited = student.config.replace(num_latent_tokens=student.config.num_latent_tokens + 1)
    (out / CONFIG_FILE).write_text(edited.to_json())
    with pytest.raises(ValueError, match="different exports or one was edited"):
        open_clip.create_model(f"local-dir:{out}")


# --------------------------------------------------------------------------
# timm folders
# --------------------------------------------------------------------------
def test_timm_export_of_a_supervised_student_reloads_with_equal_outputs(tmp_path, images):
    teacher = _teacher({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                        "model_kwargs": TINY_VIT_KWARGS})
    student, _ = bootstrap_student(teacher)
    _randomise(student)
    student.eval()
    out = export_timm(student, tmp_path / "timm")
    assert json.loads((out / "config.json").read_text())["architecture"] == "sparseformer"
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), student(images), rtol=0, atol=0)
    assert reloaded.proj.out_features == 10 and reloaded.proj.bias is not None
    data_cfg = timm.data.resolve_data_config({}, model=reloaded)
    assert tuple(data_cfg["mean"]) == tuple(teacher.preprocess.mean) and tuple(data_cfg["input_size"]) == (3, 32, 32)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_timm(student, out)


# --------------------------------------------------------------------------
# From a run folder, and in a fresh process
# --------------------------------------------------------------------------
def _fake_run(run_dir, student, spec, pretrained_cfg=None):
    run_dir.mkdir(parents=True)
    save_file(student.state_dict(), str(run_dir / "student.safetensors"))
    (run_dir / "student_config.json").write_text(student.config.to_json())
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"teacher": spec, "student": {}}))
    if pretrained_cfg is not None:
        (run_dir / "pretrained_cfg.json").write_text(json.dumps(pretrained_cfg))
    return run_dir


def test_cli_exports_a_clip_run_that_a_fresh_process_reloads(tmp_path, clip_pair, images, capsys):
    teacher, student = clip_pair
    weights = tmp_path / "teacher.safetensors"
    save_file(teacher.model.state_dict(), str(weights))
    run = _fake_run(tmp_path / "run", student, _clip_spec(str(weights)))

    assert main([str(run)]) == 0
    out = run / "export_openclip"
    printed = capsys.readouterr().out
    assert printed.startswith(f"exported to {out}\nload it with:\n")
    snippet = printed.split("load it with:\n", 1)[1]  # run below as printed, in a fresh process
    assert "load_openclip_export" in (out / "README.md").read_text()
    assert main([str(run)]) == 2 and "--overwrite" in capsys.readouterr().err

    tokens = teacher.tokenizer(CLASSNAMES)
    with torch.no_grad():
        expected = {"images": images, "image": student(images), "text": teacher.encode_text(tokens)}
    save_file(expected, str(tmp_path / "expected.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
e = load_file({str(tmp_path / 'expected.safetensors')!r})
{snippet}
model.eval().requires_grad_(False)  # frozen like the teacher (same attention kernel)
torch.set_num_threads({torch.get_num_threads()})  # as here: small matrix products round by thread count
with torch.no_grad():
    torch.testing.assert_close(model.encode_image(e["images"]), e["image"], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_text(tokenizer({CLASSNAMES!r})), e["text"], rtol=0, atol=1e-6)
print("reloaded", model.visual.trunk.__class__.__name__)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded SparseFormer" in done.stdout


def test_export_run_of_a_supervised_run_writes_a_timm_folder(tmp_path, images):
    torch.manual_seed(3)
    teacher = _teacher({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                        "model_kwargs": TINY_VIT_KWARGS})
    student, _ = bootstrap_student(teacher)
    student.eval()
    spec = {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None, "model_kwargs": TINY_VIT_KWARGS}
    run = _fake_run(tmp_path / "run", student, spec, pretrained_cfg=student.pretrained_cfg)
    out = export_run(run, tmp_path / "exported")
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), student(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no text tower; export it with --format timm"):
        export_run(run, tmp_path / "as_clip", "openclip")


def test_export_run_names_what_a_run_folder_lacks(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "student_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="student.safetensors, recipe.yaml"):
        export_run(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown export format"):
        export_run(tmp_path / "run", fmt="onnx")
