"""The loss functions the families' training phases are made of, and the terms of the run's objective.

The alignment loss: how far the student's embedding is from the teacher's, for the same image.
The paper does not state its loss (design notes); cosine distance is the default because
CLIP zero-shot and retrieval only use the direction of an embedding. Smooth-L1 and MSE
also match its length (or, with ``normalize``, compare the unit vectors). A token-level term
compares final-normed tokens; a KL term compares logits (distillation from a classifier).

The recipe's ``objective:`` (`objective_terms`) makes the terms every family's training phase holds: alignment
with the teacher's embedding, cross-entropy with the batch's labels (timm's label-smoothing and soft-target
cross-entropy: after Mixup/CutMix the labels are soft targets, smoothed there), and DeiT's soft distillation,
KL to a supervised teacher's logits at a temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .family import LossTerm, Phase, enter_objective_phase, forward_outputs_of

__all__ = ["LOSS_TYPES", "alignment_loss", "alignment_term", "batch_cosine", "distill_term", "kl_to_logits",
           "label_loss", "label_term", "objective_outputs", "objective_phase", "objective_terms", "teacher_logits_fn", "token_loss"]

LOSS_TYPES = ("cosine", "smooth_l1", "mse")


def alignment_loss(student: Tensor, teacher: Tensor, type: str = "cosine", beta: float = 1.0,
                   normalize: bool = False) -> Tensor:
    """Mean alignment loss over the batch of embeddings ``student``, ``teacher`` ``[B, D]``.

    Computed in float32 whatever the autocast dtype of the forward passes.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher target {tuple(teacher.shape)} differ: "
                         "is the student aligned to the right teacher output (proj vs pre-logits)?")
    s, t = student.float(), teacher.float()
    if type == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if type == "smooth_l1":
        return F.smooth_l1_loss(s, t, beta=beta)
    if type == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown loss type {type!r}; choose one of {', '.join(LOSS_TYPES)}")


@torch.no_grad()
def batch_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean cosine similarity student <-> teacher over a batch (a logged metric)."""
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def token_loss(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """The sparse phase's token-level term: MSE of the final-normed patch tokens ``[B, N, C]``."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {tuple(student_tokens.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)} differ: compare the same tokens (patches, final-normed)")
    return F.mse_loss(student_tokens.float(), teacher_tokens.float())


def kl_to_logits(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the softened class distributions, times T² (Hinton et al.), batch mean."""
    s_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * temperature ** 2


def alignment_term(loss_cfg, weight: float = 1.0) -> LossTerm:
    """The alignment of the student's output with the teacher's embedding (``loss_cfg``: the recipe's
    ``loss:`` section: type, beta, normalize)."""

    def fn(out, target):
        return alignment_loss(out["embedding"], target["embedding"], loss_cfg.type, loss_cfg.beta, loss_cfg.normalize)

    return LossTerm("align", weight, ("embedding",), fn)


def label_loss(logits: Tensor, labels: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of ``logits`` [B, C] with ``labels``: class indices [B] with label smoothing (timm's
    `LabelSmoothingCrossEntropy`), or soft targets [B, C] (timm's `SoftTargetCrossEntropy`: Mixup/CutMix
    targets, already smoothed). In float32."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if labels.dim() == 2:
        return SoftTargetCrossEntropy()(logits.float(), labels.float())
    return LabelSmoothingCrossEntropy(smoothing)(logits.float(), labels)


def label_term(weight: float = 1.0, smoothing: float = 0.0) -> LossTerm:
    """Cross-entropy of the student's logits with the batch's labels (`label_loss`)."""

    def fn(out, target):
        return label_loss(out["logits"], target["labels"], smoothing)

    return LossTerm("labels", weight, ("labels",), fn, reads=("logits",))


def teacher_logits_fn(teacher):
    """``embedding -> logits``: a supervised teacher's classifier on its pre-logits embedding (its head, copied),
    or None for a teacher without one (a CLIP's head is a projection, not a classifier)."""
    head = teacher.head_state_dict() if teacher is not None and teacher.family == "supervised" \
        and teacher.target == "norm" else None
    if head is None:
        return None
    weight = head["weight"].detach().clone()
    bias = head.get("bias")
    bias = None if bias is None else bias.detach().clone()

    def logits(embedding: Tensor) -> Tensor:
        return F.linear(embedding.float(), weight.to(embedding.device), None if bias is None else bias.to(embedding.device))

    return logits


def distill_term(teacher, weight: float = 1.0, temperature: float = 1.0, name: str = "distill") -> LossTerm:
    """KL of the student's logits to the teacher's (its classifier on its embedding of the same, possibly mixed,
    images) at ``temperature``: DeiT's soft distillation, per image (``kl_to_logits``)."""
    logits = teacher_logits_fn(teacher)
    if logits is None:
        raise ValueError(f"distillation needs a supervised teacher with a classifier head; teacher "
                         f"{getattr(teacher, 'kind', '?')}:{getattr(teacher, 'name', '?')} has none")

    def fn(out, target):
        return kl_to_logits(out["logits"], logits(target["embedding"]), temperature)

    return LossTerm(name, weight, ("embedding",), fn, reads=("logits",))


def objective_terms(ctx) -> list[LossTerm]:
    """The terms of the recipe's objective (``ctx.objective``; None: alignment alone): alignment with the
    teacher's embedding, cross-entropy with labels, distillation from the teacher's logits, those of weight > 0."""
    o = ctx.objective
    if o is None:
        return [alignment_term(ctx.loss)]
    terms = []
    if o.align > 0:
        terms.append(alignment_term(ctx.loss, o.align))
    if o.labels > 0:
        terms.append(label_term(o.labels, o.label_smoothing))
    if o.distill > 0:
        terms.append(distill_term(ctx.teacher, o.distill, o.temperature))
    return terms


def objective_outputs(terms) -> tuple[str, ...]:
    """What a phase holding ``terms`` needs from the student's training forward: the embedding the teacher's is
    compared with, and the head's logits where a term reads them (labels, distillation)."""
    reads = {r for t in terms for r in t.reads}
    return ("embedding",) + (("logits",) if "logits" in reads else ())


def objective_phase(ctx) -> Phase:
    """The one phase of a family trained on the recipe's objective over the whole schedule (``align`` where that
    is the alignment alone, else ``train``)."""
    o = ctx.optim
    terms = tuple(objective_terms(ctx))
    name = "align" if [t.name for t in terms] == ["align"] else "train"
    return Phase(name, o.steps, o.lr, o.min_lr, o.warmup_steps, objective_outputs(terms), terms)


class OnePhaseTraining:
    """The training of a family that learns in one phase on the recipe's objective (SparseFormer, budget): its
    `StudentFamily` phases, enter, forward and steps."""

    enter = staticmethod(enter_objective_phase)  # the construction applied the policy; the head trains where the
    forward = staticmethod(forward_outputs_of)  # phase reads the logits

    @staticmethod
    def phases(ctx) -> list[Phase]:
        return [objective_phase(ctx)]

    @staticmethod
    def steps(options, optim) -> int:
        return optim.steps
