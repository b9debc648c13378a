"""Frozen ViT teachers for bootstrapping SparseFormer students.

    from teachers import create_teacher
    teacher = create_teacher({"kind": "openclip", "model": "ViT-L-14-quickgelu", "pretrained": "openai"})
    target = teacher.embed(images)            # [B, teacher.embed_dim]
    teacher.block_state_dict(i)               # block i in timm Block layout, LayerScale folded
    teacher.norm_state_dict(), teacher.head_state_dict()
    teacher.rope                              # rotary teachers (PE-Core, EVA-02, DINOv3): RotaryPositions, else None

See `teachers.factory` for the spec keys and `teachers.base.Teacher` for the interface.
"""

from .base import (
    BLOCK_KEYS,
    BlockModules,
    SUPPORTED_TEACHERS,
    Preprocess,
    RandomTeacherWarning,
    Teacher,
    TeacherSpecError,
    TeacherWeightsError,
    UnsupportedTeacherError,
)
from .factory import KINDS, SPEC_KEYS, create_teacher, resolve_spec
from .rope import RotaryPositions

__all__ = [
    "BLOCK_KEYS",
    "BlockModules",
    "KINDS",
    "Preprocess",
    "RandomTeacherWarning",
    "RotaryPositions",
    "SPEC_KEYS",
    "SUPPORTED_TEACHERS",
    "Teacher",
    "TeacherSpecError",
    "TeacherWeightsError",
    "UnsupportedTeacherError",
    "create_teacher",
    "resolve_spec",
]
