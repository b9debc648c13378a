"""Sparsifiner (Wei et al., CVPR 2023): the teacher's whole ViT with a learned, per-image sparse attention.

    model.py        Sparsifiner (timm's VisionTransformer with SparsifinerAttention), exact to the authors' code
    config.py       SparsifinerConfig
    mask_kernel.py  the compiled CPU kernel that writes each query row's top-key mask
    construct.py    a student built from a teacher: its whole tower + fresh predictors (`sparsify`)
    training.py     how the run trains it (reconstruct, then sparse)
    timm_names.py   its names in timm (and open_clip's local-dir: loading)
    pictures.py     what it attends to: the keys a few queries keep (`kept_keys.png`)
    cost.py         its attention cost, executed and under the mask
"""

from __future__ import annotations

from ..family import ExtraSection, ReportPicture, StudentFamily, VisionDescription, vit_tower_encoding
from . import training
from .config import SparsifinerConfig
from .construct import SparsifyOptions, sparsifier_config, sparsify
from .cost import attention_markdown, measure_attention
from .model import PHASES, Sparsifiner, SparsifinerOutput
from .pictures import draw_kept_keys
from .timm_names import NAMED, NAMES
from .training import SparsifinerOptions

__all__ = ["FAMILY", "NAMED", "PHASES", "Sparsifiner", "SparsifinerConfig", "SparsifinerOptions", "SparsifinerOutput",
           "SparsifyOptions", "sparsifier_config", "sparsify"]


def _describe(student: Sparsifiner) -> dict:
    # A whole ViT: its sequence, the class token (where there is one) included.
    n, cls = student.num_tokens, student.config.class_token
    return dict(latent_tokens=n, cls_token=cls, tokens=str(n),
                token_text=f"{n} tokens" + (" (the class token included)" if cls else ""))


def _vision_describe(config) -> dict:
    cfg = SparsifinerConfig.from_dict(config)
    # Registers count as image tokens: LLaVA's 'default' drops only the first (class) token.
    return dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
                num_latent_tokens=cfg.num_tokens - int(cfg.class_token), class_token=cfg.class_token,
                projection_dim=cfg.num_classes)


FAMILY = StudentFamily(
    name="sparsifiner", config=SparsifinerConfig, models=(Sparsifiner,), options=SparsifinerOptions,
    build=training.build, phases=training.phases, enter=training.enter, forward=training.forward,
    steps=training.steps, describe=_describe, timm=NAMES, vision=VisionDescription(_vision_describe, vit_tower_encoding),
    pictures=(ReportPicture("kept_keys", "kept_keys.png", draw_kept_keys, "What the student attends to",
                            "For a few query patches (red squares) of a few images, the keys each keeps in the last "
                            "sparse block (head 0), lit; the rest dimmed."),),
    sections=(ExtraSection("attention_cost", measure_attention, attention_markdown),),
    no_scratch="it is its teacher's ViT with sparse attention added: it starts from the teacher, or from a "
               "Sparsifiner run",
)
