"""Students: SparseFormer and Sparsifiner, their configurations, and their construction from a teacher."""

from .config import CompatibleConfig, ConfigError, GridSampleConfig, SparseFormerConfig
from .sparseformer import MediaSparseFormer, SparseFormer, SparseFormerOutput, SparseFormerTrace
from .sparsifiner import Sparsifiner, SparsifinerConfig, SparsifinerOutput

__all__ = [
    "CompatibleConfig",
    "ConfigError",
    "GridSampleConfig",
    "MediaSparseFormer",
    "SparseFormer",
    "SparseFormerConfig",
    "SparseFormerOutput",
    "SparseFormerTrace",
    "Sparsifiner",
    "SparsifinerConfig",
    "SparsifinerOutput",
]
from .registry import (
    CheckpointMismatchError,
    create_model,
    get_config,
    get_pretrained_cfg,
    list_models,
    load_checkpoint_strict,
    load_state_dict_file,
    load_student,
)

__all__ += [
    "CheckpointMismatchError",
    "create_model",
    "get_config",
    "get_pretrained_cfg",
    "list_models",
    "load_checkpoint_strict",
    "load_state_dict_file",
    "load_student",
]
from .sparsify import PhasedParameterPolicy, SparsifyOptions, sparsify

__all__ += ["PhasedParameterPolicy", "SparsifyOptions", "sparsify"]
from . import timm_models  # registers SparseFormer with timm (and open_clip's local-dir: loading)
