"""Students as transformers vision models and LLaVA vision towers (the `[mllm]` extra)."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="the [mllm] extra (transformers) is not installed")

import students.transformers_model as stm  # noqa: E402
from conftest import ROOT  # noqa: E402
from data.transforms import eval_transform  # noqa: E402
from students import SparseFormer, create_model  # noqa: E402
from students.sparseformer.construct import bootstrap_student  # noqa: E402
from students.sparseformer.released import v1_config  # noqa: E402
from students.to_transformers import convert, main  # noqa: E402
from teachers import create_teacher  # noqa: E402

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 6, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_SPEC = {"kind": "openclip", "model": "tiny-clip", "model_cfg": TINY_CLIP_CFG, "pretrained": None}
TIMM_SPEC = {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
             "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 64, "num_heads": 2}}
IMAGE_TOKEN = 63  # the last id of the tiny vocabulary (llava_config's default)


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _student(spec, seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weight teachers warn, on purpose
        teacher = create_teacher(spec)
    _randomise(teacher.model)
    student, _ = bootstrap_student(teacher, tokens=9, num_points=4, conv_dim=16, pg_inner_dim=16)
    _randomise(student)
    return student.eval()


def text_config():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def student():
    return _student(CLIP_SPEC, 0)  # 8 latent tokens + the class token, 4 inherited blocks of width 64


@pytest.fixture(scope="module")
def vision(student):
    return stm.StudentVisionModel.from_student(student, teacher=CLIP_SPEC)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _projected(llava, pixel_values, **selection):
    """The projected image features of the first image (an output object in transformers 5, a tensor before)."""
    out = llava.model.get_image_features(pixel_values=pixel_values, **selection)
    return out.pooler_output[0] if hasattr(out, "pooler_output") else out[0]


def _prompt(n_image_tokens):
    return torch.tensor([[1, 5] + [IMAGE_TOKEN] * n_image_tokens + [7, 8, 9]])


# --------------------------------------------------------------------------
# The vision model
# --------------------------------------------------------------------------
def test_vision_model_returns_the_students_tokens_pooled_feature_and_embedding(student, vision, images):
    cfg = vision.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_latent_tokens, cfg.class_token, cfg.projection_dim) == \
        (64, 4, 8, True, 32)
    assert cfg.num_image_tokens == 9 and cfg.image_size == [32, 32]
    with torch.no_grad():
        out = vision(images, output_hidden_states=True)
        assert len(out.hidden_states) == cfg.num_hidden_layers + 1
        for layer in range(-cfg.num_hidden_layers - 1, cfg.num_hidden_layers + 1):
            if layer != -1:
                assert torch.equal(out.hidden_states[layer], student.forward_tokens(images, layer=layer))
        assert torch.equal(out.last_hidden_state, student.forward_tokens(images))
        # As for CLIP, hidden_states[-1] (LLaVA's vision_feature_layer=-1) is the last block's raw output.
        assert torch.equal(out.hidden_states[-1], student.forward_tokens(images, layer=cfg.num_hidden_layers))
        torch.testing.assert_close(out.pooler_output, student(images, pre_logits=True), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.image_embeds, student(images), rtol=0, atol=1e-6)
        assert vision(images).hidden_states is None
        as_tuple = vision(images, return_dict=False)
        assert torch.equal(as_tuple[0], out.last_hidden_state)


def test_registered_with_auto_classes(vision):
    saved = {k: v for k, v in vision.config.to_dict().items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(stm.MODEL_TYPE, **saved)
    assert isinstance(config, stm.StudentVisionConfig)
    model = transformers.AutoModel.from_config(config)
    assert isinstance(model, stm.StudentVisionModel) and isinstance(model.student, SparseFormer)
    assert model.student.config == vision.student.config


# --------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,class_token", [("default", False), ("full", True)])
def test_llava_on_the_student_projects_its_tokens_and_generates(student, vision, images, strategy, class_token):
    torch.manual_seed(2)
    llava = stm.build_llava(vision, text_config(), vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    assert isinstance(llava, transformers.LlavaForConditionalGeneration)
    n = 9 if class_token else 8  # the student's tokens, not a patch grid
    assert llava.config.image_seq_length == n
    image = images[:1]
    with torch.no_grad():
        features = _projected(llava, image, vision_feature_layer=-2, vision_feature_select_strategy=strategy)
        tokens = student.forward_tokens(image, layer=-2, class_token=class_token)
        assert torch.equal(features, llava.model.multi_modal_projector(tokens)[0])
        logits = llava(input_ids=_prompt(n), pixel_values=image).logits
        assert logits.shape == (1, n + 5, 64) and torch.isfinite(logits).all()
        generated = llava.generate(input_ids=_prompt(n), pixel_values=image, max_new_tokens=3, min_new_tokens=3,
                                   do_sample=False)
        assert generated.shape == (1, n + 5 + 3)
        with pytest.raises(ValueError, match="do not match"):  # one placeholder per student token, no more
            llava(input_ids=_prompt(n + 1), pixel_values=image)


def test_auto_image_text_model_builds_on_the_student_config(student, vision, images):
    config = stm.llava_config(vision.config, text_config(), vision_feature_layer=[0, -2])
    llava = transformers.AutoModelForImageTextToText.from_config(config).eval()
    assert isinstance(llava.model.vision_tower, stm.StudentVisionModel)
    llava.model.vision_tower.load_state_dict(vision.state_dict())
    with torch.no_grad():  # several layers: concatenated along the channels, as for CLIP
        features = _projected(llava, images[:1])
        tokens = torch.cat([student.forward_tokens(images[:1], layer=k, class_token=False) for k in (0, -2)], -1)
        assert torch.equal(features, llava.model.multi_modal_projector(tokens)[0])


def test_llava_selection_errors_name_the_fix(vision):
    with pytest.raises(IndexError, match=r"vision_feature_layer -6 is outside the student: it has 4 blocks.*\[-5, 4\]"):
        stm.llava_config(vision.config, text_config(), vision_feature_layer=-6)
    with pytest.raises(ValueError, match="'default' .* or 'full'"):
        stm.llava_config(vision.config, text_config(), vision_feature_select_strategy="cls")
    cfg = v1_config("tiny_v1", 9, 64, 64, 3, 0.0)
    v1 = SparseFormer({**cfg, "num_sampling_points": 4, "conv_dim": 16})
    v1_vision = stm.StudentVisionModel.from_student(v1, pretrained_cfg=dict(
        input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(ValueError, match="has none .* use 'full'"):
        stm.llava_config(v1_vision.config, text_config())
    full = stm.llava_config(v1_vision.config, text_config(), vision_feature_select_strategy="full")
    assert full.image_seq_length == 9


def test_without_llava_the_error_names_the_version_and_fix(vision, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(stm, "transformers", SimpleNamespace(__version__="4.30.0"))  # a release before LLaVA
    with pytest.raises(ImportError, match=r"has no LlavaForConditionalGeneration.*pip install -U"):
        stm.build_llava(vision, text_config())


def test_attach_to_llava_keeps_the_projector_and_needs_a_clip_student(student, vision, images):
    torch.manual_seed(3)
    # A LLaVA whose projector reads 64-wide tokens, as if trained on the teacher's tower.
    llava = stm.build_llava(vision, text_config())
    projector = {k: v.clone() for k, v in llava.model.multi_modal_projector.state_dict().items()}
    fresh = stm.StudentVisionModel.from_student(student, teacher=CLIP_SPEC)
    assert stm.attach_to_llava(llava, fresh) is llava and llava.model.vision_tower is fresh
    assert all(torch.equal(v, llava.model.multi_modal_projector.state_dict()[k]) for k, v in projector.items())
    with torch.no_grad():
        features = _projected(llava, images[:1])
        tokens = student.forward_tokens(images[:1], layer=-2, class_token=False)
        assert torch.equal(features, llava.model.multi_modal_projector(tokens)[0])

    supervised = stm.StudentVisionModel.from_student(_student(TIMM_SPEC, 4), teacher=TIMM_SPEC)
    with pytest.raises(ValueError, match="timm:vit_tiny_patch16_224, not a CLIP tower.*needs a student of the CLIP"):
        stm.attach_to_llava(llava, supervised)
    no_teacher = stm.StudentVisionModel.from_student(student)
    with pytest.raises(ValueError, match="records no teacher"):
        stm.attach_to_llava(llava, no_teacher)


def test_a_sparsifiner_student_is_a_llava_tower_through_its_family_entry(images):
    from students.sparsifiner import Sparsifiner

    torch.manual_seed(7)  # a whole ViT with sparse attention: 1 class + 2 registers + 16 patches, 3 blocks
    student = Sparsifiner(dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                               basis_coef_topk=2, reg_tokens=2)).eval()
    vision = stm.StudentVisionModel.from_student(student, pretrained_cfg=dict(
        input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3), teacher=CLIP_SPEC)
    cfg = vision.config
    assert (cfg.family, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_image_tokens) == ("sparsifiner", 32, 3, 19)
    with torch.no_grad():
        out = vision(images, output_hidden_states=True)
        assert len(out.hidden_states) == 4
        for layer in (0, 1, -2, 3):
            assert torch.equal(out.hidden_states[layer], student.forward_tokens(images, layer=layer))
        torch.testing.assert_close(out.last_hidden_state, student.forward_tokens(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.image_embeds, student(images), rtol=0, atol=1e-5)
        llava = stm.build_llava(vision, text_config())
        features = _projected(llava, images[:1])
        # 'default' drops the class token only: the registers stay image tokens (18 with the 16 patches)
        assert features.shape[0] == llava.config.image_seq_length == 18
        assert torch.equal(features, llava.model.multi_modal_projector(
            student.forward_tokens(images[:1], layer=-2)[:, 1:])[0])
        generated = llava.generate(input_ids=_prompt(18), pixel_values=images[:1], max_new_tokens=2,
                                   min_new_tokens=2, do_sample=False)
        assert generated.shape == (1, 18 + 5 + 2)


@pytest.mark.parametrize("head", [dict(class_token=False, global_pool="map"),  # SigLIP
                                  dict(global_pool="avg", fc_norm=True)])  # mean, then fc_norm
def test_a_sparsifiner_without_a_class_token_or_with_fc_norm_is_a_vision_model(images, head):
    from students.sparsifiner import Sparsifiner

    torch.manual_seed(7)
    student = Sparsifiner(dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                               basis_coef_topk=2, **head)).eval()
    vision = stm.StudentVisionModel.from_student(student, pretrained_cfg=dict(
        input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3), teacher=CLIP_SPEC)
    cfg = vision.config
    assert (cfg.class_token, cfg.num_image_tokens) == (student.config.class_token, student.num_tokens)
    with torch.no_grad():
        out = vision(images)
        torch.testing.assert_close(out.last_hidden_state, student.forward_tokens(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.pooler_output, student(images, pre_logits=True), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------
def test_image_processor_is_the_students_eval_transform():
    pcfg = dict(input_size=(3, 32, 32), mean=(0.48, 0.45, 0.4), std=(0.27, 0.26, 0.28), interpolation="bicubic",
                crop_pct=0.875)
    rng = np.random.default_rng(0)
    # A smooth image: the two resize implementations (PIL vs torch bicubic) agree on it to rounding.
    yy, xx = np.mgrid[0:48, 0:64]
    pixels = np.stack([127 + 100 * np.sin(xx / 9), 127 + 100 * np.cos(yy / 7), 127 + 60 * np.sin((xx + yy) / 11)], -1)
    image = Image.fromarray((pixels + rng.normal(0, 1, pixels.shape)).clip(0, 255).astype("uint8"))
    ours = stm.image_processor(pcfg)(images=image, return_tensors="pt").pixel_values[0]
    reference = eval_transform(32, pcfg["mean"], pcfg["std"], "bicubic", 0.875)(image)
    assert ours.shape == reference.shape == (3, 32, 32)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0.05)  # 0.05 / std ~ 3/255 of a pixel value


def test_llava_processor_writes_one_placeholder_per_student_token(vision):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "describe", "the", "image", "<image>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # "<image>" is a special token, so that the processor's run of placeholders splits into one id each.
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                                     additional_special_tokens=["<image>"])
    image = Image.fromarray(np.full((40, 50, 3), 128, dtype="uint8"))
    for strategy, n in (("default", 8), ("full", 9)):
        processor = transformers.LlavaProcessor(
            image_processor=stm.image_processor(vision.config), tokenizer=tokenizer, image_token="<image>",
            vision_feature_select_strategy=strategy, **stm.llava_processor_kwargs(vision.config))
        inputs = processor(images=image, text="USER: <image> describe the image ASSISTANT:", return_tensors="pt")
        assert (inputs.input_ids == words.index("<image>")).sum() == n
        assert inputs.pixel_values.shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------
# Folders and the command line
# --------------------------------------------------------------------------
def _fake_run(run_dir, student, spec):
    run_dir.mkdir(parents=True)
    save_file(student.state_dict(), str(run_dir / "student.safetensors"))
    (run_dir / "student_config.json").write_text(student.config.to_json())
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"teacher": spec, "student": {}}))
    (run_dir / "pretrained_cfg.json").write_text(json.dumps(student.pretrained_cfg))
    return run_dir


def test_a_converted_run_and_its_llava_reload_in_a_fresh_process(tmp_path, student, images, capsys):
    run = _fake_run(tmp_path / "run", student, CLIP_SPEC)
    out = tmp_path / "vision"
    assert main([str(run), str(out)]) == 0
    assert "AutoModel.from_pretrained" in capsys.readouterr().out
    assert main([str(run), str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(out))

    vision = transformers.AutoModel.from_pretrained(out)
    assert vision.config.teacher == json.loads(json.dumps(CLIP_SPEC))
    torch.manual_seed(5)
    llava = stm.build_llava(vision, text_config())
    llava.save_pretrained(tmp_path / "llava")
    with torch.no_grad():
        expected = {"images": images[:1], "ids": _prompt(8),
                    "tokens": student.forward_tokens(images[:1], layer=-2),
                    "logits": llava(input_ids=_prompt(8), pixel_values=images[:1]).logits}
    save_file(expected, str(tmp_path / "expected.safetensors"))
    script = f"""
import torch, students.transformers_model
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText
torch.set_num_threads({torch.get_num_threads()})  # as here: small matrix products round by thread count
e = load_file({str(tmp_path / 'expected.safetensors')!r})
vision = AutoModel.from_pretrained({str(out)!r}).eval()
llava = AutoModelForImageTextToText.from_pretrained({str(tmp_path / 'llava')!r}).eval()
processor = AutoImageProcessor.from_pretrained({str(out)!r})
with torch.no_grad():
    # Not bit-equal: memory-mapped weights are aligned differently, and CPU kernels round accordingly.
    torch.testing.assert_close(vision(e["images"], output_hidden_states=True).hidden_states[-2], e["tokens"],
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(llava(input_ids=e["ids"], pixel_values=e["images"]).logits, e["logits"],
                               rtol=1e-5, atol=1e-4)
print("reloaded", type(llava).__name__, type(llava.model.vision_tower).__name__, type(processor).__name__)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded LlavaForConditionalGeneration StudentVisionModel CLIPImageProcessor" in done.stdout


def test_a_released_checkpoint_converts_by_name(tmp_path):
    torch.manual_seed(6)
    model = create_model("sparseformer_v1_tiny")
    weights = tmp_path / "v1_tiny.safetensors"
    save_file(model.state_dict(), str(weights))
    with pytest.raises(ValueError, match="--weights FILE"):
        convert("sparseformer_v1_tiny", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="neither a run folder nor a released model name"):
        convert("sparseformer_v9", tmp_path / "out")
    # verify=False: the reload check is the run test's; here it would only cost two 224-px passes.
    out = convert("sparseformer_v1_tiny", tmp_path / "out", weights=str(weights), verify=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == stm.MODEL_TYPE and config["teacher"] is None
    reloaded = load_file(out / "model.safetensors")
    assert all(torch.equal(reloaded["student." + k], v) for k, v in model.state_dict().items())
    assert config["num_hidden_layers"] == 7 and config["hidden_size"] == 512
