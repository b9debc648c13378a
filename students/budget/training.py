"""How the run trains a budget ViT: one phase that aligns its output, on fewer tokens, with the teacher's embedding of
the same images at full resolution (the alignment loss every family uses), or trains on the recipe's objective
(`students.losses.objective_terms`: labels, distillation, alignment)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..family import ParameterPolicy, Phase, PhaseContext, enter_objective_phase, forward_outputs_of
from ..losses import objective_phase
from .construct import BudgetOptions, budget_student

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher


def build(teacher: "Teacher", options: BudgetOptions) -> tuple[nn.Module, ParameterPolicy]:
    return budget_student(teacher, options=options)


def phases(ctx: PhaseContext) -> list[Phase]:
    return [objective_phase(ctx)]


def enter(student: nn.Module, policy: ParameterPolicy, phase: Phase) -> ParameterPolicy:
    # One phase; the construction applied the policy. The head trains where the phase reads the logits.
    return enter_objective_phase(student, policy, phase)


def forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    return forward_outputs_of(student, images, outputs, pre_logits)


def steps(options: Any, optim: Any) -> int:
    return optim.steps
