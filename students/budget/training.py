"""How the run trains a budget ViT: one phase that aligns its output, on fewer tokens, with the teacher's embedding of
the same images at full resolution (the alignment loss every family uses), or trains on the recipe's objective
(`students.losses.objective_terms`: labels, distillation, alignment)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..family import ParameterPolicy
from ..losses import OnePhaseTraining
from .construct import BudgetOptions, budget_student

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher


def build(teacher: "Teacher", options: BudgetOptions) -> tuple[nn.Module, ParameterPolicy]:
    return budget_student(teacher, options=options)


phases, enter, forward, steps = (OnePhaseTraining.phases, OnePhaseTraining.enter, OnePhaseTraining.forward,
                                 OnePhaseTraining.steps)
