"""How the run trains a SparseFormer student: one phase with the recipe's objective (`students.losses.objective_terms`:
alignment with the teacher's embedding, by default; labels; distillation), and how it starts from scratch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..family import ParameterPolicy, Phase, PhaseContext, enter_objective_phase, forward_outputs_of
from ..losses import objective_phase
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


def phases(ctx: PhaseContext) -> list[Phase]:
    return [objective_phase(ctx)]


def enter(student: nn.Module, policy: ParameterPolicy, phase: Phase) -> ParameterPolicy:
    # One phase; the construction applied the policy. The head trains where the phase reads the logits.
    return enter_objective_phase(student, policy, phase)


def forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    return forward_outputs_of(student, images, outputs, pre_logits)


def steps(options: Any, optim: Any) -> int:
    return optim.steps
