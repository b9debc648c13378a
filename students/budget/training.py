"""How the run trains a budget ViT: one phase that aligns its output, on fewer tokens, with the teacher's embedding of
the same images at full resolution (the alignment loss every family uses), or trains on the recipe's objective
(`students.losses.objective_terms`: labels, distillation, alignment)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..family import ParameterPolicy, Phase, PhaseContext
from ..losses import objective_outputs, objective_terms
from .construct import BudgetOptions, budget_student

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher


def build(teacher: "Teacher", options: BudgetOptions) -> tuple[nn.Module, ParameterPolicy]:
    return budget_student(teacher, options=options)


def phases(ctx: PhaseContext) -> list[Phase]:
    o = ctx.optim
    terms = tuple(objective_terms(ctx))
    name = "align" if [t.name for t in terms] == ["align"] else "train"
    return [Phase(name, o.steps, o.lr, o.min_lr, o.warmup_steps, objective_outputs(terms), terms)]


def enter(student: nn.Module, policy: ParameterPolicy, phase: Phase) -> ParameterPolicy:
    # One phase; budget_student applied the policy. The head trains where the phase reads the logits.
    if "logits" in phase.outputs and policy.logits_only:
        policy.unfreeze(student, policy.logits_only)
    return policy


def forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    if "logits" not in outputs:
        return {"embedding": student(images, pre_logits=pre_logits)}
    pre, logits = student.forward_outputs(images)
    return {"embedding": pre if pre_logits else logits, "logits": logits}


def steps(options: Any, optim: Any) -> int:
    return optim.steps
