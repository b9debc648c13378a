"""How the run trains a student family: its recipe options, its construction, its phases and their loss terms.

The run (`bootstrap.train`) has one loop and no per-family branches; it asks the student's
`Training` entry for

* ``options``: the dataclass a recipe's ``student:`` section fills (``kind`` picks the family);
* ``build(teacher, options)``: the student and its parameter policy;
* ``phases(ctx)``: the `Phase` list, run one after the other. A phase names the steps it
  runs, its learning-rate schedule, what the student's training forward must return
  (``outputs``), and its `LossTerm` s, each with a weight, the teacher targets it needs
  (``embedding`` [B, D], ``tokens`` [B, N, C] final-normed, ``attention``: one [B, H, N, N]
  map per block) and a function of (student outputs, teacher targets);
* ``enter(student, policy, phase)``: set what trains (``requires_grad``) and the model's own
  phase switch, explicitly (no shared config is mutated).

SparseFormer has one phase (align the output with the teacher's embedding). Sparsifiner has
two: reconstruct (only the connectivity predictors train, on the teacher's attention maps)
and sparse (the backbone trains with the masks on the alignment plus a token term; KL on
logits for supervised teachers); see ``../shared/design/sparsifiner.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bootstrap import BootstrapOptions
from .sparsify import SparsifyOptions

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher

TARGETS = ("embedding", "tokens", "attention")


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a phase's loss: ``weight * fn(student_outputs, teacher_targets)``."""

    name: str
    weight: float
    needs: tuple[str, ...]  # teacher targets, from TARGETS
    fn: Callable[[Mapping[str, Any], Mapping[str, Any]], Tensor]


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own trainable parameters, optimizer schedule and loss."""

    name: str
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    outputs: tuple[str, ...]  # what the student's training forward returns (see `Training.forward`)
    terms: tuple[LossTerm, ...]

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(t for t in TARGETS if any(t in term.needs for term in self.terms))


@dataclass
class PhaseContext:
    """What a family's phases are made from (passed explicitly; nothing global is read)."""

    options: Any  # the family's options
    student: nn.Module
    teacher: "Teacher"
    loss: Any  # bootstrap.config.LossConfig: the alignment loss
    optim: Any  # bootstrap.config.OptimConfig: lr, min_lr, warmup_steps, steps


@dataclass(frozen=True)
class Training:
    """A student family as the run sees it."""

    family: str
    options: type
    build: Callable[["Teacher", Any], tuple[nn.Module, Any]]
    phases: Callable[[PhaseContext], list[Phase]]
    enter: Callable[[nn.Module, Any, Phase], Any]  # -> the phase's ParameterPolicy
    forward: Callable[[nn.Module, Tensor, tuple[str, ...], bool], dict[str, Any]]
    steps: Callable[[Any, Any], int]  # (options, optim) -> all steps of all phases, without building anything


# ----------------------------------------------------------------------------- the loss terms


def alignment_term(loss_cfg, weight: float = 1.0) -> LossTerm:
    """The project's alignment of the student's output with the teacher's embedding (`bootstrap.loss`)."""
    from bootstrap.loss import alignment_loss

    def fn(out, target):
        return alignment_loss(out["embedding"], target["embedding"], loss_cfg.type, loss_cfg.beta, loss_cfg.normalize)

    return LossTerm("align", weight, ("embedding",), fn)


# ----------------------------------------------------------------------------- SparseFormer




def _sparseformer_build(teacher: "Teacher", options) -> tuple[nn.Module, Any]:
    from .bootstrap import bootstrap_student

    student, policy = bootstrap_student(teacher, **dataclasses.asdict(options))
    if teacher.target != "proj" and any(p.requires_grad for p in student.proj.parameters()):
        # The aligned output stops before the head, so the head would get no gradient.
        student.proj.requires_grad_(False)
        moved = sum(p.numel() for p in student.proj.parameters())
        for name in [n for n in policy.trainable if n.startswith("proj.")]:
            policy.trainable.remove(name)
            policy.frozen.append(name)
        policy.num_trainable -= moved  # the counts follow the lists (the run's summary reports them)
        policy.num_frozen += moved
    return student, policy


def _sparseformer_phases(ctx: PhaseContext) -> list[Phase]:
    o = ctx.optim
    return [Phase("align", o.steps, o.lr, o.min_lr, o.warmup_steps, ("embedding",), (alignment_term(ctx.loss),))]


def _sparseformer_enter(student: nn.Module, policy, phase: Phase):
    # bootstrap_student already set requires_grad; one phase, nothing to switch.
    return policy


def _embedding_forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    return {"embedding": student(images, pre_logits=pre_logits)}


# ----------------------------------------------------------------------------- Sparsifiner


@dataclass
class SparsifinerOptions(SparsifyOptions):
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


def _sparsifiner_build(teacher: "Teacher", options) -> tuple[nn.Module, Any]:
    from .sparsify import sparsify

    return sparsify(teacher, **options.construction())


def _sparsifiner_phases(ctx: PhaseContext) -> list[Phase]:
    from bootstrap.loss import attention_reconstruction_loss, token_loss

    opts, student, teacher, o = ctx.options, ctx.student, ctx.teacher, ctx.optim
    sparse_blocks = list(student.sparse_blocks)
    prefix = student.num_prefix_tokens

    def reconstruct(out, target):
        return attention_reconstruction_loss([out["approx_attn"][i] for i in sparse_blocks],
                                             [target["attention"][i] for i in sparse_blocks], weight=1.0)

    def tokens(out, target):  # the patch tokens: the prefix tokens (class token, registers) are aligned above
        return token_loss(out["tokens"][:, prefix:], target["tokens"][:, prefix:])

    sparse_terms = [alignment_term(ctx.loss)]
    if opts.token_weight > 0:
        sparse_terms.append(LossTerm("tokens", opts.token_weight, ("tokens",), tokens))
    head = teacher.head_state_dict() if teacher.family == "supervised" else None
    if head is not None and opts.kl_weight > 0:
        weight = head["weight"].detach().clone()
        bias = head.get("bias")
        bias = None if bias is None else bias.detach().clone()
        temp = opts.kl_temperature

        def kl(out, target):
            t_logits = F.linear(target["embedding"].float(), weight.to(target["embedding"].device),
                                None if bias is None else bias.to(target["embedding"].device))
            s_log = F.log_softmax(out["logits"].float() / temp, dim=-1)
            return F.kl_div(s_log, F.log_softmax(t_logits / temp, dim=-1), log_target=True,
                            reduction="batchmean") * temp ** 2

        sparse_terms.append(LossTerm("kl", opts.kl_weight, ("embedding",), kl))
    sparse_outputs = ("embedding", "tokens", "logits") if len(sparse_terms) > 1 else ("embedding",)
    return [
        Phase("reconstruct", opts.reconstruct_steps, opts.reconstruct_lr, o.min_lr, opts.reconstruct_warmup_steps,
              ("approx_attn",), (LossTerm("reconstruct", opts.reconstruct_weight, ("attention",), reconstruct),)),
        Phase("sparse", o.steps, o.lr, o.min_lr, o.warmup_steps, sparse_outputs, tuple(sparse_terms)),
    ]


def _sparsifiner_enter(student: nn.Module, policy, phase: Phase):
    return policy.apply(student, phase.name)  # requires_grad and student.set_phase


def _sparsifiner_forward(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    if outputs == ("embedding",):
        return {"embedding": student(images, pre_logits=pre_logits)}
    # The reconstruct phase needs each block's approximation (maps); the sparse phase only tokens and logits.
    details = student.forward_details(images, attention=False, maps="approx_attn" in outputs)
    return {"embedding": details.pre_logits if pre_logits else details.output, "logits": details.output,
            "tokens": details.tokens, "approx_attn": details.approx_attn}


# ----------------------------------------------------------------------------- the table




TRAININGS: dict[str, Callable[[], Training]] = {
    "sparseformer": lambda: Training("sparseformer", BootstrapOptions, _sparseformer_build,
                                     _sparseformer_phases, _sparseformer_enter, _embedding_forward,
                                     lambda options, optim: optim.steps),
    "sparsifiner": lambda: Training("sparsifiner", SparsifinerOptions, _sparsifiner_build,
                                    _sparsifiner_phases, _sparsifiner_enter, _sparsifiner_forward,
                                    lambda options, optim: options.reconstruct_steps + optim.steps),
}
DEFAULT_KIND = "sparseformer"


def training_for(kind: str) -> Training:
    if kind not in TRAININGS:
        import difflib

        close = difflib.get_close_matches(str(kind), list(TRAININGS), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown student kind {kind!r}.{hint} The kinds are {', '.join(TRAININGS)}")
    return TRAININGS[kind]()


def training_of(options: Any) -> Training:
    """The `Training` whose options class `options` is an instance of."""
    for kind in TRAININGS:
        training = training_for(kind)
        if isinstance(options, training.options):
            return training
    raise TypeError(f"{type(options).__name__} is not the options of any student kind ({', '.join(TRAININGS)})")
