"""SparseFormer: a few latent tokens with learned RoIs instead of hundreds of patches (arXiv 2304.03768), and its
students bootstrapped from a ViT teacher (arXiv 2312.01987).

    model.py       SparseFormer and MediaSparseFormer (video), exact to the released checkpoints
    video.py       video students: an image student inflated to clips (`inflate`)
    config.py      SparseFormerConfig (the released JSON form)
    released.py    the released configurations (v1 and btsp), as data
    construct.py   a student built from a teacher: its last 2N/3 blocks, norm and head (`bootstrap_student`)
    training.py    how the run trains it (one phase of the recipe's objective) and starts it from scratch
    timm_names.py  its names in timm (and open_clip's local-dir: loading)
    pictures.py    where it looks: RoIs and sampling points (`rois.png`)
"""

from __future__ import annotations

from torch import Tensor

from ..family import StudentEncoding, StudentFamily, VisionDescription, ReportPicture
from . import training
from .config import CompatibleConfig, GridSampleConfig, SparseFormerConfig
from .construct import BootstrapOptions, bootstrap_student
from .model import (MediaSparseFormer, SparseFormer, SparseFormerOutput, SparseFormerTrace, first_block_unit,
                    model_class)
from .pictures import draw_rois
from .released import RELEASED, get_config, get_pretrained_cfg, get_teacher_spec, list_models
from .timm_names import NAMES

__all__ = ["BootstrapOptions", "CompatibleConfig", "FAMILY", "GridSampleConfig", "MediaSparseFormer", "RELEASED",
           "SparseFormer", "SparseFormerConfig", "SparseFormerOutput", "SparseFormerTrace", "bootstrap_student",
           "get_config", "get_pretrained_cfg", "get_teacher_spec", "list_models"]


def _describe(student: SparseFormer) -> dict:
    n, cls = student.num_tokens, student.config.has_cls_token
    return dict(latent_tokens=n, cls_token=cls, tokens=f"{n} latent" + (" + cls" if cls else ""),
                token_text=f"{n} latent tokens" + (" + a class token" if cls else ""))


def _vision_describe(config) -> dict:
    cfg = SparseFormerConfig.from_dict(config)
    return dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_units - first_block_unit(cfg),
                num_latent_tokens=cfg.num_latent_tokens, class_token=cfg.has_cls_token,
                projection_dim=cfg.proj_dim)


def _vision_encode(student: SparseFormer, images: Tensor) -> StudentEncoding:
    states = student.forward_hidden_states(images)
    pooled = student.forward_head(states[-1], pre_logits=True)  # pools the raw tokens, then norms
    return StudentEncoding(states, student.norm(states[-1]), pooled, student.proj(pooled))


FAMILY = StudentFamily(
    name="sparseformer", config=SparseFormerConfig, models=(SparseFormer, MediaSparseFormer),
    options=BootstrapOptions, build=training.build, phases=training.phases, enter=training.enter,
    forward=training.forward, steps=training.steps, describe=_describe, timm=NAMES,
    vision=VisionDescription(_vision_describe, _vision_encode), scratch=training.scratch, named=training.named,
    pictures=(ReportPicture("rois", "rois.png", draw_rois, "Where the student looks",
                            "Each token's RoI and sampling points at every sampling stage, then the final RoIs."),),
    model_of=model_class,
)
