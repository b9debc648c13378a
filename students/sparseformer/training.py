"""How the run trains a SparseFormer student: one phase that aligns its output with the teacher's embedding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..family import ParameterPolicy, Phase, PhaseContext
from ..losses import alignment_term
from .construct import BootstrapOptions, bootstrap_student

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher


def build(teacher: "Teacher", options: BootstrapOptions) -> tuple[nn.Module, ParameterPolicy]:
    student, policy = bootstrap_student(teacher, options=options)
    if teacher.target != "proj":
        # The aligned output stops before the head, so the head would get no gradient; its parameters
        # move to the frozen side with their counts (the run's summary reports them).
        policy.freeze(student, "proj.")
    return student, policy


def phases(ctx: PhaseContext) -> list[Phase]:
    o = ctx.optim
    return [Phase("align", o.steps, o.lr, o.min_lr, o.warmup_steps, ("embedding",), (alignment_term(ctx.loss),))]


def enter(student: nn.Module, policy: ParameterPolicy, phase: Phase) -> ParameterPolicy:
    # bootstrap_student already set requires_grad; one phase, nothing to switch.
    return policy


def forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    return {"embedding": student(images, pre_logits=pre_logits)}


def steps(options: Any, optim: Any) -> int:
    return optim.steps
