"""How the run trains a Sparsifiner student: two phases (`../shared/design/sparsifiner.md`).

* reconstruct: only the connectivity predictors train, on the teacher's attention maps;
* sparse: the backbone trains with the masks on the recipe's objective (the alignment loss by default;
  labels) plus a token term (MSE of the final-normed patch tokens) and, for supervised teachers, KL of the
  logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..family import InitOptions, LossTerm, ParameterPolicy, PhasedParameterPolicy, Phase, PhaseContext
from ..losses import distill_term, objective_outputs, objective_terms, teacher_logits_fn, token_loss
from .construct import SparsifyOptions, sparsify

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher


@dataclass
class SparsifinerOptions(SparsifyOptions, InitOptions):
    """A recipe's `student:` section for `kind: sparsifiner`: the construction (`SparsifyOptions`)
    and the two phases. `optim.*` is the sparse phase's; the reconstruct phase has its own steps,
    learning rate and warm-up (the authors': 5 of 50 epochs at 3e-4, then 45 at 8e-5)."""

    reconstruct_steps: int = 1000  # only the predictors train, on the teacher's attention maps
    reconstruct_lr: float = 3e-4
    reconstruct_warmup_steps: int = 100
    reconstruct_weight: float = 0.01  # x sum over batch, heads, rows, keys; mean over blocks (the authors')
    token_weight: float = 0.5  # sparse phase: + this x MSE of the final-normed patch tokens
    kl_weight: float = 0.5  # sparse phase, supervised teachers: + this x KL(student logits || teacher logits)
    kl_temperature: float = 1.0

    def __post_init__(self):
        if self.reconstruct_steps < 0 or self.reconstruct_warmup_steps < 0:
            raise ValueError(f"student.reconstruct_steps and reconstruct_warmup_steps must be >= 0, got "
                             f"{self.reconstruct_steps} and {self.reconstruct_warmup_steps}")
        if self.reconstruct_warmup_steps > self.reconstruct_steps:
            raise ValueError(f"student.reconstruct_warmup_steps={self.reconstruct_warmup_steps} must not exceed "
                             f"student.reconstruct_steps={self.reconstruct_steps}")
        if not self.reconstruct_lr > 0 or self.kl_temperature <= 0:
            raise ValueError("student.reconstruct_lr and kl_temperature must be above 0")
        for key in ("reconstruct_weight", "token_weight", "kl_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"student.{key} must be >= 0, got {getattr(self, key)}")

    def construction(self) -> dict:
        """The `sparsify` options alone."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SparsifyOptions)}


def attention_reconstruction_loss(approx: list[Tensor], teacher_attention: list[Tensor],
                                  weight: float = 0.01) -> Tensor:
    """The reconstruct phase: ``weight · mean over blocks of Σ (approx − teacher_attention[:, :, P:])²``.

    ``approx[i]`` is block i's low-rank approximation ``[B, H, N−P, N]`` (`Sparsifiner.forward_details`),
    ``teacher_attention[i]`` the teacher's dense post-softmax map ``[B, H, N, N]``
    (`Teacher.attention_maps`). The P prefix query rows (class token, registers), which always attend
    densely, are left out: P is read from the shapes. The sum runs over batch, heads, rows and keys, as
    the authors' loss (so it grows with the batch size).
    """
    if len(approx) != len(teacher_attention) or not approx:
        raise ValueError(f"{len(approx)} approximations for {len(teacher_attention)} teacher attention maps: "
                         f"give one teacher map per student block")
    total = 0.0
    for i, (a, t) in enumerate(zip(approx, teacher_attention)):
        b, h, rows, n = a.shape
        if t.shape[:2] != (b, h) or t.shape[-2:] != (n, n) or rows > n:
            raise ValueError(f"block {i}: approximation {tuple(a.shape)} does not fit the teacher's attention "
                             f"{tuple(t.shape)} (expected [B, H, N, N] with N = {n})")
        total = total + (a.float() - t[:, :, n - rows:].float()).square().sum()
    return weight * total / len(approx)


def build(teacher: "Teacher", options: SparsifinerOptions):
    return sparsify(teacher, **options.construction())


def phases(ctx: PhaseContext) -> list[Phase]:
    opts, student, teacher, o = ctx.options, ctx.student, ctx.teacher, ctx.optim
    sparse_blocks = list(student.sparse_blocks)
    prefix = student.num_prefix_tokens

    def reconstruct(out, target):
        return attention_reconstruction_loss([out["approx_attn"][i] for i in sparse_blocks],
                                             [target["attention"][i] for i in sparse_blocks], weight=1.0)

    def tokens(out, target):  # the patch tokens: the prefix tokens (class token, registers) are aligned above
        return token_loss(out["tokens"][:, prefix:], target["tokens"][:, prefix:])

    sparse_terms = objective_terms(ctx)
    if opts.token_weight > 0:
        sparse_terms.append(LossTerm("tokens", opts.token_weight, ("tokens",), tokens, reads=("tokens",)))
    if opts.kl_weight > 0 and teacher_logits_fn(teacher) is not None:
        if ctx.objective is not None and ctx.objective.distill > 0:
            raise ValueError("objective.distill and student.kl_weight both distil the teacher's logits in the sparse "
                             "phase; set one of them to 0")
        sparse_terms.append(distill_term(teacher, opts.kl_weight, opts.kl_temperature, name="kl"))
    sparse_outputs = ("embedding", "tokens", "logits") if len(sparse_terms) > 1 else objective_outputs(sparse_terms)
    return [
        Phase("reconstruct", opts.reconstruct_steps, opts.reconstruct_lr, o.min_lr, opts.reconstruct_warmup_steps,
              ("approx_attn",), (LossTerm("reconstruct", opts.reconstruct_weight, ("attention",), reconstruct),)),
        Phase("sparse", o.steps, o.lr, o.min_lr, o.warmup_steps, sparse_outputs, tuple(sparse_terms)),
    ]


def enter(student: nn.Module, policy, phase: Phase) -> ParameterPolicy:
    if isinstance(policy, PhasedParameterPolicy):
        return policy.apply(student, phase.name)  # requires_grad and student.set_phase
    student.set_phase(phase.name)  # a student fine-tuned from a run: everything trains
    return policy.apply(student)


def forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    if outputs == ("embedding",):
        return {"embedding": student(images, pre_logits=pre_logits)}
    # The reconstruct phase needs each block's approximation (maps); the sparse phase only tokens and logits.
    details = student.forward_details(images, attention=False, maps="approx_attn" in outputs)
    return {"embedding": details.pre_logits if pre_logits else details.output, "logits": details.output,
            "tokens": details.tokens, "approx_attn": details.approx_attn}


def steps(options: SparsifinerOptions, optim: Any) -> int:
    return options.reconstruct_steps + optim.steps
