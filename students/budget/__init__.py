"""The teacher itself at a smaller token budget, fine-tuned: the trained baseline a token-efficient student must beat.

A budget ViT is its teacher's whole tower run on fewer patch tokens, at a lower input resolution or with a larger
(resampled) patch, chosen in the recipe (`student: {kind: budget, tokens: 49, reduce: resolution | patch}`), and
fine-tuned by the alignment loss to the teacher's full-resolution output. It takes the teacher's images and
reduces them itself.

    model.py        BudgetViT (timm's VisionTransformer, the resize first)
    config.py       BudgetConfig
    construct.py    a student built from a teacher: its tower, the stem resampled to the budget (`budget_student`)
    training.py     how the run trains it (one alignment phase)
    timm_names.py   its names in timm (and open_clip's local-dir: loading)
"""

from __future__ import annotations

from ..family import StudentFamily, VisionDescription, vit_tower_encoding
from . import training
from .config import BudgetConfig
from .construct import BudgetOptions, budget_config, budget_student
from .model import BudgetOutput, BudgetViT
from .timm_names import NAMES

__all__ = ["FAMILY", "BudgetConfig", "BudgetOptions", "BudgetOutput", "BudgetViT", "budget_config", "budget_student"]


def _describe(student: BudgetViT) -> dict:
    cfg = student.config
    n, cls = cfg.num_patches, cfg.class_token
    (gh, gw), (h, w) = cfg.grid_size, cfg.image_hw
    how = f"{gh}x{gw} patches of {cfg.patch_size} px at {h}x{w}"
    return dict(latent_tokens=n, cls_token=cls, tokens=f"{n} patches" + (" + cls" if cls else ""),
                token_text=f"{n} patch tokens ({how})" + (" + a class token" if cls else ""), how=how)


def _vision_describe(config) -> dict:
    cfg = BudgetConfig.from_dict(config)
    # Registers count as image tokens: LLaVA's 'default' drops only the first (class) token.
    return dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
                num_latent_tokens=cfg.num_patches + cfg.reg_tokens, class_token=cfg.class_token,
                projection_dim=cfg.num_classes)


FAMILY = StudentFamily(
    name="budget", config=BudgetConfig, models=(BudgetViT,), options=BudgetOptions, build=training.build,
    phases=training.phases, enter=training.enter, forward=training.forward, steps=training.steps,
    describe=_describe, timm=NAMES, vision=VisionDescription(_vision_describe, vit_tower_encoding),
    no_scratch="it is its teacher's tower at fewer tokens: it starts from the teacher, or from a budget run",
)
