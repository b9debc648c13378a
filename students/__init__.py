"""Students: SparseFormer, Sparsifiner and the teacher at a smaller budget, their configurations, and their
construction from a teacher.

`import students` registers every family's names with timm (and open_clip's `local-dir:` loading).
The families are rows of `students.families.FAMILIES`, each one package (`students/sparseformer/`,
`students/sparsifiner/`, `students/budget/`) behind the interface of `students.family`.
"""

from .budget import BudgetConfig, BudgetOptions, BudgetViT, budget_student
from .checkpoints import CheckpointMismatchError, load_checkpoint_strict, load_state_dict_file
from .families import (DEFAULT_FAMILY, FAMILIES, create_model, family_named, family_of, load_student,
                       student_from_config)
from .family import ConfigError, ParameterPolicy, PhasedParameterPolicy, Student, StudentFamily
from .sparseformer import (BootstrapOptions, CompatibleConfig, GridSampleConfig, MediaSparseFormer, SparseFormer,
                           SparseFormerConfig, SparseFormerOutput, SparseFormerTrace, bootstrap_student, get_config,
                           get_pretrained_cfg, list_models)
from .sparsifiner import Sparsifiner, SparsifinerConfig, SparsifinerOutput, SparsifyOptions, sparsify
from .timm_registry import register_folder

__all__ = [
    "BootstrapOptions",
    "BudgetConfig",
    "BudgetOptions",
    "BudgetViT",
    "CheckpointMismatchError",
    "CompatibleConfig",
    "ConfigError",
    "DEFAULT_FAMILY",
    "FAMILIES",
    "GridSampleConfig",
    "MediaSparseFormer",
    "ParameterPolicy",
    "PhasedParameterPolicy",
    "SparseFormer",
    "SparseFormerConfig",
    "SparseFormerOutput",
    "SparseFormerTrace",
    "Sparsifiner",
    "SparsifinerConfig",
    "SparsifinerOutput",
    "SparsifyOptions",
    "Student",
    "StudentFamily",
    "bootstrap_student",
    "budget_student",
    "create_model",
    "family_named",
    "family_of",
    "get_config",
    "get_pretrained_cfg",
    "list_models",
    "load_checkpoint_strict",
    "load_state_dict_file",
    "load_student",
    "register_folder",
    "sparsify",
    "student_from_config",
]
