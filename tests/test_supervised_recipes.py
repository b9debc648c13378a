"""The recipes that train with labels: SparseFormer v1 from scratch equal to the authors' configs, value by value;
the AugReg fine-tuning and the supervised demo load; the README's table says what the recipes hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bootstrap.config import load_recipe
from conftest import FIXTURES, ROOT

RECIPES = ROOT / "recipes"
AUTHORS = json.loads((FIXTURES / "sparseformer_v1_authors_configs.json").read_text())


def _leaves(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _student(recipe):
    """The config and preprocessing the recipe's scratch student gets (as `students.init` builds it)."""
    from students.init import _architecture

    return _architecture(recipe.family, None, recipe.student)


def _sf(config) -> dict:
    """The authors' SF.* description of one of our v1 configs: per width, its units and the repeats of the first."""
    widths = list(dict.fromkeys(config.width_configs))
    return {"SF.CONV_DIM": config.conv_dim, "SF.NUM_LATENT_TOKENS": config.num_latent_tokens,
            "SF.TOKEN_SAMPLING_POINTS": config.num_sampling_points, "SF.WIDTH_CONFIGURATIONS": widths,
            "SF.BLOCK_SIZES": [config.width_configs.count(w) for w in widths],
            "SF.REPEATS": [config.repeats[config.width_configs.index(w)] for w in widths],
            "SF.DROP_PATH_RATE": config.drop_path_rate}


def _ours(recipe, config, pcfg) -> dict:
    """Each key of the authors' config that decides what their run computes, as our recipe gives it."""
    o, d, b, a, r = recipe.objective, recipe.data, recipe.optim, recipe.data.augment, recipe.run
    return {
        "DATA.BATCH_SIZE": d.batch_size, "DATA.IMG_SIZE": pcfg["input_size"][1],
        "DATA.INTERPOLATION": pcfg["interpolation"], "DATA.NUM_WORKERS": d.num_workers,
        "EMA.ENABLE": b.ema_decay is not None, "EMA.DECAY": b.ema_decay,
        "MODEL.TYPE": recipe.family.name, "MODEL.NUM_CLASSES": config.proj_dim,
        "MODEL.LABEL_SMOOTHING": o.label_smoothing,
        **_sf(config),
        "TRAIN.START_EPOCH": 0, "TRAIN.EPOCHS": b.epochs, "TRAIN.WARMUP_EPOCHS": b.warmup_epochs,
        "TRAIN.WEIGHT_DECAY": b.weight_decay, "TRAIN.BASE_LR": b.lr, "TRAIN.WARMUP_LR": b.warmup_lr,
        "TRAIN.MIN_LR": b.min_lr, "TRAIN.CLIP_GRAD": b.grad_clip,
        "TRAIN.ACCUMULATION_STEPS": 0 if b.grad_accum == 1 else b.grad_accum,  # theirs: 0 (or 1) is none
        "TRAIN.LR_SCHEDULER.NAME": {"timm_cosine": "cosine"}.get(b.schedule, b.schedule),
        "TRAIN.OPTIMIZER.NAME": "adamw", "TRAIN.OPTIMIZER.EPS": b.eps, "TRAIN.OPTIMIZER.BETAS": list(b.betas),
        "AUG.COLOR_JITTER": a.get("color_jitter"), "AUG.AUTO_AUGMENT": a.get("auto_augment"),
        "AUG.REPROB": a.get("re_prob"), "AUG.REMODE": a.get("re_mode"), "AUG.RECOUNT": a.get("re_count"),
        "AUG.MIXUP": o.mixup, "AUG.CUTMIX": o.cutmix, "AUG.CUTMIX_MINMAX": o.cutmix_minmax,
        "AUG.MIXUP_PROB": o.mixup_prob, "AUG.MIXUP_SWITCH_PROB": o.mixup_switch_prob, "AUG.MIXUP_MODE": o.mixup_mode,
        "TEST.CROP": pcfg["crop_pct"] == 224 / 256,  # resize to 256, centre crop 224
        "SEED": r.seed, "AMP_OPT_LEVEL": "" if r.mixed_precision == "no" else r.mixed_precision,
    }


# What their config holds that decides nothing their run computes (where a run writes, how it loads files), or
# that another model reads; and what differs (docs/supervised.md says why).
NOT_COMPUTED = {"BASE", "DATA.DATA_PATH", "DATA.DATASET", "DATA.ZIP_MODE", "DATA.CACHE_MODE", "DATA.PIN_MEMORY",
                "MODEL.NAME", "MODEL.PRETRAINED", "MODEL.RESUME", "TRAIN.AUTO_RESUME", "TRAIN.USE_CHECKPOINT",
                "SAVE_FREQ", "PRINT_FREQ", "TAG", "EVAL_MODE", "THROUGHPUT_MODE", "LOCAL_RANK", "NOVA_MODE"}
OTHER_MODELS = ("MODEL.SWIN.", "MODEL.SWIN_MLP.", "MODEL.DROP_RATE", "MODEL.DROP_PATH_RATE",  # Swin's (SF.* is ours)
                "TRAIN.LR_SCHEDULER.DECAY_", "TRAIN.OPTIMIZER.MOMENTUM")  # the step scheduler's, SGD's
DIFFERENT = {"DATA.REPEAT_AUG": True, "DATA.REPEAT_AUG_NUM": 3}  # repeated augmentation: not in our stream


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_the_v1_recipes_are_the_authors_configs(size):
    recipe = load_recipe(RECIPES / f"sparseformer_v1_{size}.yaml", ["data.train=/data/train"])
    config, pcfg = _student(recipe)
    ours = _ours(recipe, config, pcfg)
    theirs = dict(_leaves(AUTHORS[size]))
    for key, value in theirs.items():
        if key in ours:
            assert ours[key] == value, f"{key}: ours {ours[key]!r}, the authors' {value!r}"
        elif key in DIFFERENT:
            assert value == DIFFERENT[key], key
        else:
            assert key in NOT_COMPUTED or key.startswith(OTHER_MODELS), f"{key} = {value!r} is not checked"
    assert set(ours) <= set(theirs)
    # Their training code's model: the gradient restriction and its normalisations; no teacher.
    assert config.compatible_config.restrict_grad_norm and config.compatible_config.imagenet_code_norms
    assert not recipe.teacher and recipe.objective.align == 0 and recipe.student.init == "scratch"
    assert recipe.optim.lr_base_batch == 512


def test_the_finetuning_and_demo_recipes_load(tmp_path):
    finetune = load_recipe(RECIPES / "augreg_base_finetune.yaml", ["data.train=/data/train",
                                                                    f"student.init={tmp_path}"])
    assert finetune.objective.labels == 1 and finetune.optim.layer_decay == 0.75 and finetune.optim.ema_decay
    demo = load_recipe(RECIPES / "demo_supervised.yaml")
    assert demo.demo is not None and not demo.teacher and demo.student.init == "scratch"
    config, pcfg = _student(demo)
    assert pcfg["input_size"] == (3, 64, 64) and config.num_latent_tokens == 16


def test_the_readme_table_says_what_the_recipes_hold():
    """The README's table of the recipes that train with labels: each row's tokens, epochs, batch and lr are the
    recipe's."""
    text = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `recipes/(sparseformer_v1_\w+)\.yaml` \|(.*)$", text,
                                                      re.MULTILINE)}
    assert set(rows) == {"sparseformer_v1_tiny", "sparseformer_v1_small", "sparseformer_v1_base"}
    for name, row in rows.items():
        recipe = load_recipe(RECIPES / f"{name}.yaml", ["data.train=/data/train"])
        config, _ = _student(recipe)
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert cells[0] == str(config.num_latent_tokens), name
        assert cells[1] == f"{recipe.optim.epochs:g} ({recipe.optim.warmup_epochs:g})", name
        assert cells[2] == f"{recipe.optim.lr:g} x batch / {recipe.optim.lr_base_batch}", name
        assert cells[3] == f"{config.drop_path_rate:g}", name
