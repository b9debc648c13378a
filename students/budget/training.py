"""How the run trains a budget ViT: one phase that aligns its output, on fewer tokens, with the teacher's embedding of
the same images at full resolution (the alignment loss every family uses)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..family import ParameterPolicy, Phase, PhaseContext
from ..losses import alignment_term
from .construct import BudgetOptions, budget_student

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher


def build(teacher: "Teacher", options: BudgetOptions) -> tuple[nn.Module, ParameterPolicy]:
    return budget_student(teacher, options=options)


def phases(ctx: PhaseContext) -> list[Phase]:
    o = ctx.optim
    return [Phase("align", o.steps, o.lr, o.min_lr, o.warmup_steps, ("embedding",), (alignment_term(ctx.loss),))]


def enter(student: nn.Module, policy: ParameterPolicy, phase: Phase) -> ParameterPolicy:
    return policy  # one phase; budget_student applied the policy


def forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    return {"embedding": student(images, pre_logits=pre_logits)}


def steps(options: Any, optim: Any) -> int:
    return optim.steps
