"""Sparsifiner students in timm's registry, in `load_student`, and exported to OpenCLIP and timm folders."""

import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from students import Sparsifiner, SparsifinerConfig, load_student, sparsify
from students.export import export_openclip, export_timm
from students.families import family_of
from students.sparsifiner.timm_names import HASH_PREFIX, NAMED, timm_name
from test_export import _clip_spec, _randomise, _teacher, images  # noqa: F401 (a fixture)
from test_sparsifiner import FIX, _case, rel


@pytest.fixture(scope="module")
def clip_pair():
    torch.manual_seed(1)
    teacher = _teacher(_clip_spec())
    student, _ = sparsify(teacher, keep_rate=0.5, basis_coef_topk=2)
    _randomise(student)
    return teacher, student.eval()


@pytest.mark.parametrize("name", list(NAMED))
def test_named_configurations_build_in_timm(name):
    model = timm.create_model(name, device="meta")
    assert isinstance(model, Sparsifiner) and timm_name(model.config) == name
    assert model.pretrained_cfg["input_size"][1:] == tuple([model.config.img_size] * 2)


def test_deit_small_is_the_papers_setting():
    cfg = timm.create_model("sparsifiner_deit_small_patch16_224", device="meta").config
    assert (cfg.num_tokens, cfg.reduced_dim, cfg.num_basis, cfg.budgets[0]) == (197, 32, 32, 50)


def test_authors_weights_load_by_checkpoint_path_and_reproduce_their_output(tmp_path):
    meta, model, io = _case("sparsifiner_tiny_shared")
    path = tmp_path / "w.safetensors"
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    reloaded = timm.create_model("sparsifiner", config=meta["config"], checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert rel(reloaded(io["input"]), io["output"]) < 1e-5


def test_load_student_dispatches_on_the_family(tmp_path, clip_pair, images):
    _, student = clip_pair
    (tmp_path / "student_config.json").write_text(student.config.to_json())
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "s.safetensors"))
    loaded = load_student(tmp_path / "student_config.json", tmp_path / "s.safetensors").eval()
    assert isinstance(loaded, Sparsifiner) and loaded.config == student.config
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))
    assert family_of(json.loads(student.config.to_json())).name == "sparsifiner"
    assert family_of({"conv_dim": 64}).name == "sparseformer"  # released SparseFormer JSON has no family


def test_openclip_export_has_student_images_and_teacher_text(tmp_path, clip_pair, images):
    teacher, student = clip_pair
    out = export_openclip(student, teacher, tmp_path / "oc")
    assert (out / "sparsifiner_config.json").is_file()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(["a photo of a dog."])
    model.eval()
    assert model.visual.trunk.__class__ is Sparsifiner
    assert model.visual.trunk.config.img_size == 32
    assert timm_name(student.config).startswith(HASH_PREFIX)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), student(images), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), teacher.encode_text(tokens), atol=1e-5)
        assert torch.equal(model.logit_scale, teacher.model.logit_scale)


def test_timm_export_reloads_with_equal_outputs(tmp_path, clip_pair, images):
    _, student = clip_pair
    out = export_timm(student, tmp_path / "timm")
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images), student(images))


def test_timm_refuses_another_image_size():
    with pytest.raises(ValueError, match="fix its size to 224"):
        timm.create_model("sparsifiner_deit_small_patch16_224", img_size=384, device="meta")
