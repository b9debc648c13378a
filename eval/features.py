"""Features of teacher and student over an evaluation loader, from the same batches.

One pass over the data feeds every image to both models, so each comparison is on the same
images (even were the transform random). Bootstrapped students share the teacher's
preprocessing, so the loader uses the teacher's eval transform.

The student output compared with ``teacher.embed(x)`` is the one it was aligned to:
``student(x)`` (after the inherited projection) when ``teacher.target == "proj"`` (CLIP), else
its pre-logits feature (pooled, normed, before the inherited classifier).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

Step = Callable[[Tensor], Mapping[str, Tensor]]


def student_outputs(student: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(pre_logits, output)`` of a student in one forward pass (`students.family.Student.forward_outputs`; a
    ToMe teacher gives them too); any other module is taken as a plain embedding function (both are
    ``student(images)``), e.g. a teacher standing in for a perfect student."""
    if hasattr(student, "forward_outputs"):
        return student.forward_outputs(images)
    out = student(images)
    return out, out


def aligned_output(target: str, pre_logits: Tensor, output: Tensor) -> Tensor:
    """The student output aligned to the teacher's ``embed``: ``output`` for 'proj', else ``pre_logits``."""
    if target not in ("proj", "norm"):
        raise ValueError(f"unknown teacher target {target!r}; expected 'proj' (CLIP) or 'norm' (pre-logits)")
    return output if target == "proj" else pre_logits


def teacher_classifier(teacher) -> Callable[[Tensor], Tensor] | None:
    """The teacher's own classifier on its pre-logits embedding (``model.head``), or None without one."""
    if getattr(teacher, "target", None) != "norm" or not getattr(teacher, "num_classes", 0):
        return None
    head = getattr(teacher.model, "head", None)
    return head if isinstance(head, nn.Module) else None


def teacher_student_step(teacher, student: nn.Module, logits: bool = False) -> Step:
    """A function ``images -> {"teacher": ..., "student": ...}`` (aligned embeddings).

    With ``logits=True`` also ``teacher_logits`` (the teacher's classifier on its embedding) and
    ``student_logits`` (the student's inherited head), for classification.
    """
    head = teacher_classifier(teacher) if logits else None
    if logits and head is None:
        raise ValueError(
            f"teacher {getattr(teacher, 'name', teacher)} has no classifier head (family "
            f"{getattr(teacher, 'family', '?')!r}); classification needs a supervised teacher"
        )

    def step(images: Tensor) -> dict[str, Tensor]:
        t = teacher.embed(images)
        pre, out = student_outputs(student, images)
        result = {"teacher": t, "student": aligned_output(teacher.target, pre, out)}
        if logits:
            result["teacher_logits"] = head(t)
            result["student_logits"] = out
        return result

    return step


def _split_batch(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    raise TypeError(
        f"an evaluation loader must yield images [B, 3, H, W] or (images, labels); got {type(batch).__name__}"
    )


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def extract(
    loader: Iterable,
    step: Step,
    device: str | torch.device = "cpu",
    max_samples: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "features",
    progress: bool = True,
) -> dict[str, Tensor]:
    """Run ``step`` over every batch; concatenate its outputs (float32, on the CPU).

    Returns ``step``'s keys plus ``"labels"`` when the loader yields ``(images, labels)``.
    ``max_samples`` stops after that many images (the last batch is cut).
    """
    device = torch.device(device)
    chunks: dict[str, list[Tensor]] = {}
    seen = 0
    total = None
    try:
        total = len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        pass
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            images, labels = _split_batch(batch)
            if max_samples is not None:
                images = images[: max_samples - seen]
                labels = labels[: max_samples - seen] if labels is not None else None
            with autocast_context(device, autocast_dtype):
                outputs = dict(step(images.to(device, non_blocking=True)))
            if labels is not None:
                outputs["labels"] = labels
            for k, v in outputs.items():
                chunks.setdefault(k, []).append(v.detach().float().cpu() if k != "labels" else v.long().cpu())
            seen += images.shape[0]
            bar.update(images.shape[0])
            if max_samples is not None and seen >= max_samples:
                break
    if not seen:
        raise ValueError("the evaluation loader yielded no images; check the evaluation data path")
    return {k: torch.cat(v) for k, v in chunks.items()}
