"""How the run trains a SparseFormer student: one phase with the recipe's objective (`students.losses.objective_terms`:
alignment with the teacher's embedding, by default; labels; distillation), and how it starts from scratch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..family import ParameterPolicy
from ..losses import OnePhaseTraining
from .config import SparseFormerConfig
from .construct import BootstrapOptions, bootstrap_student
from .model import SparseFormer
from .released import get_pretrained_cfg, released_config

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher


def build(teacher: "Teacher", options: BootstrapOptions) -> tuple[nn.Module, ParameterPolicy]:
    student, policy = bootstrap_student(teacher, options=options)
    if teacher.target != "proj":
        # The aligned output stops before the head, so the head would get no gradient; its parameters
        # move to the frozen side with their counts (the run's summary reports them). A phase that reads the
        # logits (labels, distillation) trains them again, where they were to train (`enter`).
        policy.logits_only = [n for n in policy.trainable if n.startswith("proj.")]
        policy.freeze(student, "proj.")
    return student, policy


def scratch(config: Any, num_classes: int | None = None) -> SparseFormer:
    """A SparseFormer with the authors' initialisation (`SparseFormer.init_weights`: their `srnet_init`, and
    the early convolution's Kaiming-normal weights, fan-out, as their `EarlyConvolution`); ``num_classes``
    gives it a head over that many classes."""
    from torch.nn import init

    cfg = SparseFormerConfig.from_dict(config)
    if num_classes is not None and num_classes != cfg.proj_dim:
        cfg = cfg.replace(proj_dim=num_classes)
    model = SparseFormer(cfg)
    init.kaiming_normal_(model.feat_extractor.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def named(name: str) -> tuple[dict, dict]:
    """A released configuration and its preprocessing (a ValueError for an unknown name)."""
    return released_config(name), get_pretrained_cfg(name).to_timm()


phases, enter, forward, steps = (OnePhaseTraining.phases, OnePhaseTraining.enter, OnePhaseTraining.forward,
                                 OnePhaseTraining.steps)
