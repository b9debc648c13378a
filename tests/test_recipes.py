"""The recipes in recipes/: they load, resolve, and build the students they promise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bootstrap.config import Recipe, RecipeError, load_recipe
from students.sparseformer.construct import BootstrapOptions, student_config
from test_bootstrap_student import RELEASED, _stub_teacher

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PAPER = {
    "clip_base": ("sparseformer_btsp_openai_clip_base", _stub_teacher(12, 768, 196, "quick_gelu", 1e-5, 512, False)),
    "clip_large": ("sparseformer_btsp_openai_clip_large", _stub_teacher(24, 1024, 256, "quick_gelu", 1e-5, 768, False)),
    "augreg_base": ("sparseformer_btsp_augreg_base", _stub_teacher(12, 768, 196, "gelu", 1e-6, 1000, True)),
    "augreg_large": ("sparseformer_btsp_augreg_large", _stub_teacher(24, 1024, 576, "gelu", 1e-6, 1000, True)),
}


def test_every_recipe_is_there_and_loads(tmp_path):
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert names == ["augreg_base", "augreg_base_finetune", "augreg_large", "clip_base", "clip_base_budget",
                     "clip_large", "demo", "demo_budget", "demo_sparsifiner", "demo_supervised", "demo_video",
                     "dinov2_base", "dinov3_base", "pe_core_large", "siglip2_so400m", "siglip_base",
                     "sparseformer_v1_base", "sparseformer_v1_small", "sparseformer_v1_tiny",
                     "sparsifiner_clip_base", "sparsifiner_deit_small", "video_clip_base"]
    for name in names:
        overrides = [] if name.startswith("demo") else ["data.train=/data/train"]
        if name == "augreg_base_finetune":  # it starts from a run folder
            overrides.append(f"student.init={tmp_path}")
        recipe = load_recipe(RECIPES / f"{name}.yaml", overrides)
        assert recipe.name == name and recipe.run.output_dir == f"runs/{name}"
        # The resolved recipe reads back to the same recipe.
        again = load_recipe(None, base=yaml.safe_load(recipe.to_yaml()))
        assert again == recipe


@pytest.mark.parametrize("name,options", [("demo_sparsifiner", "SparsifinerOptions"), ("demo_budget", "BudgetOptions"),
                                          ("demo_video", "BootstrapOptions")])
def test_the_other_demos_share_the_demos_data_and_teacher(name, options):
    from bootstrap.demo_teacher import _data_key, _teacher_key

    demo, other = load_recipe(RECIPES / "demo.yaml"), load_recipe(RECIPES / f"{name}.yaml")
    assert _data_key(other.demo) == _data_key(demo.demo) and _teacher_key(other.demo) == _teacher_key(demo.demo)
    assert type(other.student).__name__ == options
    assert other.media.video == (name == "demo_video") and (name != "demo_video" or other.student.video.frames == 8)


def test_the_video_demo_starts_from_the_image_demo_with_its_own_early_convolution():
    """Its image stage is recipes/demo.yaml with this student's conv_dim, checked to fit (`bootstrap.image_stage`)."""
    from bootstrap.image_stage import image_stage

    stage = image_stage(load_recipe(RECIPES / "demo_video.yaml"), RECIPES / "demo_video.yaml")
    demo = load_recipe(RECIPES / "demo.yaml", ["student.conv_dim=16", "run.output_dir=runs/demo_video_image"])
    assert stage.image == demo and stage.folder == Path("runs/demo_video_image")
    assert stage.video.student.video.image_student == "runs/demo_video_image"
    assert stage.video.student.video.replicates == 2
    # It runs as the command runs (threads, progress bars, the demo's cache), and trains what its recipe says.
    stage = image_stage(load_recipe(RECIPES / "demo_video.yaml", ["run.cpu_threads=1", "run.progress=false",
                                                                  "demo.cache_dir=/elsewhere", "optim.steps=50"]))
    assert (stage.image.run.cpu_threads, stage.image.run.progress, stage.image.demo.cache_dir) == (1, False, "/elsewhere")
    assert stage.image.optim.steps == demo.optim.steps


@pytest.mark.parametrize("name,tokens", [("demo_budget", 16), ("clip_base_budget", 49)])
def test_budget_recipes_run_the_teacher_at_the_sparseformers_token_count(name, tokens):
    import warnings

    from bootstrap.demo_teacher import DEMO_MODEL_NAME, model_cfg
    from teachers import create_teacher

    recipe = load_recipe(RECIPES / f"{name}.yaml", [] if name.startswith("demo") else ["data.train=/data/train"])
    spec = recipe.teacher if recipe.demo is None else {
        "kind": "openclip", "model": DEMO_MODEL_NAME, "model_cfg": model_cfg(recipe.demo.teacher, recipe.demo.image_size)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = create_teacher({**spec, "pretrained": False})
    student, policy = recipe.family.build(teacher, recipe.student)
    cfg = student.config
    assert cfg.num_patches == tokens and cfg.patch_size == teacher.patch_size[0] and policy.num_frozen == 0
    assert cfg.image_hw == (teacher.grid_size[0] // 2 * teacher.patch_size[0],) * 2


@pytest.mark.parametrize("name,budget,basis,reduced", [("sparsifiner_deit_small", 50, 32, 32),
                                                      ("sparsifiner_clip_base", 50, 32, 32)])
def test_sparsifiner_recipes_build_the_papers_student(name, budget, basis, reduced):
    """The paper's DeiT-S setting (and the CLIP one): 50 of 197 keys, K = 32, c = 32, every block sparse."""
    import warnings

    from teachers import create_teacher

    recipe = load_recipe(RECIPES / f"{name}.yaml", ["data.train=/data/train"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = create_teacher({**recipe.teacher, "pretrained": False})
    student, policy = recipe.family.build(teacher, recipe.student)
    cfg = student.config
    assert student.budgets == [budget] * 12 and student.sparse_blocks == list(range(12))
    assert (cfg.num_basis, cfg.reduced_dim) == (basis, reduced)
    assert set(policy.phases) == {"reconstruct", "sparse"}


def test_real_recipes_need_training_data():
    with pytest.raises(RecipeError, match="no training data: set data.train"):
        load_recipe(RECIPES / "clip_large.yaml")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_build_the_released_students(name):
    released, teacher = PAPER[name]
    recipe = load_recipe(RECIPES / f"{name}.yaml", ["data.train=/data/train"])
    cfg = student_config(teacher, recipe.student).to_dict()
    ref = RELEASED[released]["config"]
    for key in ("num_latent_tokens", "width_configs", "repeats", "ops_list", "conv_dim", "num_sampling_points",
                "proj_dim", "cls_token_insert_layer"):
        assert cfg[key] == ref[key], key


def test_dinov2_recipe_asks_for_a_224_teacher():
    recipe = load_recipe(RECIPES / "dinov2_base.yaml", ["data.train=/data/train"])
    assert recipe.teacher["image_size"] == 224 and recipe.student.tokens == 64


# ----------------------------------------------------------------------------- the schema


def test_overrides_parse_yaml_values_and_reach_every_section():
    recipe = load_recipe(RECIPES / "clip_base.yaml", [
        "data.train=['/a/{000..009}.tar', /b/x.tar]", "data.val=/v/{0..3}.tar", "optim.lr=1e-3", "optim.betas=[0.9, 0.95]",
        "student.tokens=33", "run.mixed_precision=fp16", "loss.type=smooth_l1", "eval.templates=simple",
        "teacher.pretrained=/weights/vit.safetensors", "run.resume=none",
    ])
    assert recipe.data.train == ["/a/{000..009}.tar", "/b/x.tar"] and recipe.data.val == "/v/{0..3}.tar"
    assert recipe.optim.lr == 1e-3 and recipe.optim.betas == (0.9, 0.95)
    assert isinstance(recipe.student, BootstrapOptions) and recipe.student.tokens == 33
    assert recipe.run.mixed_precision == "fp16" and recipe.loss.type == "smooth_l1"
    assert recipe.eval.templates == "simple" and recipe.run.resume == "none"
    assert recipe.teacher["pretrained"] == "/weights/vit.safetensors"


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1e-3", r"unknown recipe key 'optim.lrr'. Did you mean 'optim.lr'\?"),
    ("student.tokns=49", r"unknown recipe key 'student.tokns'. Did you mean 'student.tokens'\?"),
    ("eval.tempaltes=demo", r"unknown recipe key 'eval.tempaltes'. Did you mean 'eval.templates'\?"),
    ("optimm.lr=1", r"unknown recipe key 'optimm'. Did you mean 'optim'\?"),
    ("optim.lr=fast", r"recipe key 'optim.lr' must be a number, got str 'fast'"),
    ("optim.steps=1.5", r"recipe key 'optim.steps' must be an integer, got float 1.5"),
    ("data.batch_size=true", r"recipe key 'data.batch_size' must be an integer, got bool"),
    ("run.progress=yes please", r"recipe key 'run.progress' must be true or false"),
    ("optim.betas=[0.9]", r"recipe key 'optim.betas' must be a list of 2 values"),
    ("loss.type=cosin", r"recipe key 'loss.type' must be one of cosine, smooth_l1, mse, got 'cosin'. Did you mean 'cosine'\?"),
    ("run.mixed_precision=bf32", r"must be one of no, bf16, fp16"),
    ("optim=3", r"'optim' must be a mapping"),
    ("optim.warmup_steps=99999", r"optim.warmup_steps=99999 must be between 0 and optim.steps"),
    ("eval.precision=fp8", r"recipe section 'eval': eval precision 'fp8'"),
    ("novalue", r"override 'novalue' must look like section.key=value"),
    ("demo.teacher.consistency_images=0", r"demo.teacher.consistency_images must be at least 1 or null"),
    ("demo.teacher.seconds=420", r"demo.teacher.seconds is no longer a key: the demo teacher trains by its steps"),
    ("demo.teacher.min_zero_shot=1.5", r"demo.teacher.min_zero_shot must be a fraction in \[0, 1\)"),
    ("demo.teacher.steps=0", r"demo.teacher.steps must be at least 1, got 0"),
    ("run.cpu_threads=0", r"run.cpu_threads must be 'auto' or at least 1, got 0"),
    ("run.cpu_threads=all", r"recipe key 'run.cpu_threads' must be int or 'auto', got str 'all'"),
    # Values that used to be accepted and then misbehaved (issue 16).
    ("optim.grad_clip=-1", r"optim.grad_clip must be above 0 or null \(no clipping\), got -1"),
    ("optim.grad_clip=0", r"optim.grad_clip must be above 0 or null"),
    ("data.heldout_samples=0", r"data.heldout_samples must be at least 2 .*got 0; set data.val=null"),
    ("data.heldout_samples=1", r"data.heldout_samples must be at least 2"),
    ("run.stop_after=-5", r"run.stop_after must be at least 1 or null .*got -5"),
    ("data.shuffle_buffer=-1", r"data.shuffle_buffer must be >= 0 .*got -1"),
    ("data.epoch_samples=-100", r"data.epoch_samples must be at least 1 or null .*got -100"),
    ("data.augment.scale=[2,1]", r"data.augment.scale must be \[min, max\] with 0 < min <= max <= 1.0, got \[2, 1\]"),
    ("data.augment.scale=[0.5]", r"data.augment.scale must be \[min, max\]"),
    ("data.augment.ratio=[1,0.5]", r"data.augment.ratio must be \[min, max\] with 0 < min <= max"),
    ("data.augment.hflip=2", r"data.augment.hflip must be a probability between 0 and 1, got 2"),
    ("data.augment.color_jitter=-0.1", r"data.augment.color_jitter must be null, a number >= 0"),
    ("data.augment.color_jitter=[0.1,0.1]", r"data.augment.color_jitter must be null"),
    ("data.augment.scal=[0.5,1]", r"unknown recipe key 'data.augment.scal'. Did you mean 'scale'\?"),
    ("run.mixed_precision=yes", r"must be one of no, bf16, fp16, got True"),
    ("run.output_dir=no", r"recipe key 'run.output_dir' must be str or null, got bool False"),
])
def test_bad_keys_and_types_are_errors_that_name_them(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "clip_base.yaml", ["data.train=/data/train", override])


@pytest.mark.parametrize("text,value", [("no", "no"), ("false", "no"), ("off", "no"), ("'no'", "no"), ("bf16", "bf16")])
def test_yaml_booleans_spell_the_string_choices_they_look_like(text, value):
    # YAML 1.1 reads `no` as False: `run.mixed_precision=no` (the documented value) must mean "no".
    recipe = load_recipe(RECIPES / "clip_base.yaml", ["data.train=/data/train", f"run.mixed_precision={text}"])
    assert recipe.run.mixed_precision == value


@pytest.mark.parametrize("text,value", [("none", "none"), ("no", "none"), ("off", "none"), ("auto", "auto"),
                                        ("runs/x", "runs/x")])
def test_resume_takes_its_words_and_paths(text, value):
    recipe = load_recipe(RECIPES / "clip_base.yaml", ["data.train=/data/train", f"run.resume={text}"])
    assert recipe.run.resume == value


def test_yaml_booleans_in_every_string_key_are_refused_or_meant():
    """No string-valued key of the schema silently turns `no`/`on` into a boolean."""
    import dataclasses
    import types
    import typing

    from bootstrap.config import Recipe

    def string_keys(cls, where=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
            key = f"{where}{f.name}"
            if any(dataclasses.is_dataclass(a) for a in args):
                yield from string_keys(next(a for a in args if dataclasses.is_dataclass(a)), key + ".")
            elif any(a is str or typing.get_origin(a) is typing.Literal for a in args):
                yield key
    keys = list(string_keys(Recipe))
    assert "run.mixed_precision" in keys and "run.output_dir" in keys and "loss.type" in keys
    for key in keys:
        for word in ("no", "on"):
            try:
                recipe = load_recipe(RECIPES / "clip_base.yaml", ["data.train=/data/train", f"{key}={word}"])
            except RecipeError as exc:
                assert key in str(exc)
                continue
            obj = recipe
            for part in key.split("."):
                obj = getattr(obj, part)
            assert not isinstance(obj, bool), f"{key}={word} became the boolean {obj}"


def test_a_recipe_needs_a_teacher_or_the_demo(tmp_path):
    with pytest.raises(RecipeError, match="no teacher"):
        load_recipe(None, ["data.train=/x"])
    path = tmp_path / "r.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must hold a mapping of sections"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_defaults_are_a_valid_recipe_with_teacher_and_data():
    recipe = load_recipe(None, ["teacher.kind=openclip", "data.train=/x"])
    assert recipe.run.output_dir == "runs/run" and recipe.loss.type == "cosine"
    assert recipe.student == BootstrapOptions() and recipe.demo is None
    assert Recipe().to_dict().keys() == recipe.to_dict().keys()
