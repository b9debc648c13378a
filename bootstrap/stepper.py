"""The run's phases and optimizer steps.

`Stepper.begin` / `Stepper.phase` enter a phase: set what it trains (the family's `enter`), wraps the student's training
forward for the phase (`TrainingForward`, prepared by accelerate: DDP sees exactly the parameters that
train) and makes a fresh AdamW with the student's weight-decay exemptions (and, with ``optim.layer_decay``,
timm's layer-wise lr scales), its learning rates scaled with the global batch (``optim.lr_base_batch``) and the
phase's schedule (`warmup_cosine`, or `timm_cosine`: the Swin codebase's). `Stepper.step(...)` runs one optimizer
step: `optim.grad_accum` micro-batches, each with its labels checked (`data.labels.batch_labels`) and mixed
with its images (timm's Mixup/CutMix, a batch transform) where the phase trains with labels, the teacher's
targets of the (mixed) images, the phase's loss terms summed by weight, the non-finite vote (every rank takes
the same decision, or DDP's all-reduce would hang), gradient clipping, the step, the EMA of the weights
(timm's ModelEmaV3, ``optim.ema_decay``) and the schedule.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from data.errors import UserError
from data.labels import LabelError, batch_labels
from students.family import Phase, StudentFamily, is_exempt_from_weight_decay
from students.losses import batch_cosine

from .checkpoint import TrainState, load_checkpoint, save_checkpoint

__all__ = ["NONFINITE_ENV", "NonFiniteLossError", "StepResult", "Stepper", "TrainingForward", "batch_mixer",
           "layer_decay_param_groups", "optimizer_param_groups", "timm_cosine", "warmup_cosine"]

# Test hook: the loss of these optimizer steps (comma-separated, 0-based) is made NaN.
NONFINITE_ENV = "BOOTSTRAP_TEST_NONFINITE_STEPS"


class TrainingForward(nn.Module):
    """The student's training forward of one phase: a dict of what the phase's loss terms read.

    ``embedding`` is what is compared with the teacher's embedding: for CLIP teachers (target
    'proj') the projected embedding, for others (target 'norm') the pre-logits feature. The
    family's `forward` computes it (and ``tokens``, ``approx_attn``, ... where the phase asks).
    Prepared (wrapped for DDP) as one module so that the distributed wrapper sees the forward that
    trains.
    """

    def __init__(self, student: nn.Module, forward, outputs: tuple[str, ...], pre_logits: bool):
        super().__init__()
        self.student = student
        self._forward, self.outputs, self.pre_logits = forward, outputs, pre_logits

    def forward(self, images: Tensor) -> dict:
        return self._forward(self.student, images, self.outputs, self.pre_logits)

    def no_weight_decay(self) -> set[str]:
        return {f"student.{name}" for name in self.student.no_weight_decay()}


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: [decay, no decay], both always there (a checkpoint's optimizer
    state keeps this order). No decay, as timm: 1-D parameters, biases and what ``model.no_weight_decay()`` names."""
    exempt = tuple(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_exempt_from_weight_decay(name, p, exempt) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0 over `warmup` steps, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def timm_cosine(step: int, warmup: int, total: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` as the Swin codebase (SparseFormer v1's `main.py`) sets it:
    timm's `CosineLRScheduler(t_initial=total, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup,
    cycle_limit=1, t_in_epochs=False)`, whose `step_update(k)` runs after step k, so that step k runs at the
    schedule's value of k - 1 (steps 0 and 1 both at ``warmup_lr``). The cosine spans all ``total`` steps (the
    warm-up included); past them the rate stays at ``min_lr``."""
    t = max(step - 1, 0)
    if t < warmup:
        return warmup_lr + t * ((lr - warmup_lr) / warmup)
    if t >= total:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))


def batch_mixer(objective, num_classes: int):
    """timm's Mixup/CutMix of a batch and its labels (soft targets, label-smoothed), or None where the objective
    mixes nothing."""
    if objective is None or not objective.mixes:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=objective.mixup, cutmix_alpha=objective.cutmix,
                 cutmix_minmax=None if objective.cutmix_minmax is None else list(objective.cutmix_minmax),
                 prob=objective.mixup_prob, switch_prob=objective.mixup_switch_prob, mode=objective.mixup_mode,
                 label_smoothing=objective.label_smoothing, num_classes=num_classes)


def layer_decay_param_groups(model: TrainingForward, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's `param_groups_layer_decay` over the student's trainable parameters (its `group_matcher`: stem,
    blocks, head), with its weight-decay exemptions; each group carries its ``lr_scale``."""
    from timm.optim import param_groups_layer_decay

    student = model.student
    if not hasattr(student, "group_matcher"):
        raise UserError(f"optim.layer_decay needs the student's layers (timm's group_matcher()); a "
                        f"{type(student).__name__} has none: set optim.layer_decay=null")
    exempt = tuple(student.no_weight_decay())
    groups = param_groups_layer_decay(student, weight_decay, no_weight_decay_list=exempt, layer_decay=layer_decay)
    # timm exempts 1-D parameters and the listed names; the fnmatch patterns and biases as ours
    names = {id(p): n for n, p in student.named_parameters()}
    out: dict[tuple, dict] = {}
    for group in groups:
        for p in group["params"]:
            exempted = is_exempt_from_weight_decay(names[id(p)], p, exempt)
            key = (group["lr_scale"], exempted)
            out.setdefault(key, {"params": [], "weight_decay": 0.0 if exempted else weight_decay,
                                 "lr_scale": group["lr_scale"]})["params"].append(p)
    return list(out.values())


def nonfinite_test_steps() -> set[int]:
    text = os.environ.get(NONFINITE_ENV, "")
    return {int(s) for s in text.split(",") if s.strip()}


@dataclass
class StepResult:
    """What one optimizer step did: whether it was skipped (a non-finite loss or gradient), the loss and each
    term summed over its micro-batches (tensors on the device), the gradient norm and the time spent waiting
    for data."""

    skipped: bool = False
    sums: dict[str, Tensor] = field(default_factory=dict)
    grad_norm: float | None = None  # None: the loss was not finite, no gradient was formed
    wait: float = 0.0


class NonFiniteLossError(UserError, RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient, or the student's outputs diverged."""


class Stepper:
    """The training of one run, phase by phase and step by step (see the module docstring).

    ``phases`` are the family's; `begin` enters the phase a run starts (or resumes) in, `step` runs one optimizer
    step and moves ``state`` on, `save` writes a checkpoint of the phase's module, optimizer and schedule.
    """

    def __init__(self, accelerator, family: StudentFamily, student: nn.Module, policy, phases: list[Phase],
                 pre_logits: bool, recipe, checkpoints, say: Callable[[str], None],
                 classnames: list[str] | None = None):
        self.accelerator, self.family, self.student, self.policy = accelerator, family, student, policy
        self.phases, self.pre_logits, self.optim, self.run = phases, pre_logits, recipe.optim, recipe.run
        self.global_batch = recipe.data.batch_size * accelerator.num_processes * recipe.optim.grad_accum
        self.checkpoints, self.say = checkpoints, say
        self.num_classes = len(classnames) if classnames else 0
        self.mix = batch_mixer(getattr(recipe, "objective", None), self.num_classes)
        o = recipe.optim
        # Learning rates given for the global batch optim.lr_base_batch scale linearly to the run's.
        self.lr_scale = self.global_batch / o.lr_base_batch if o.lr_base_batch else 1.0
        self.inject = nonfinite_test_steps()
        self.model = self.optimizer = self.scheduler = self.ema = None
        self.grad_norm = float("nan")  # the last step's that formed a gradient (logged)

    @property
    def ema_model(self) -> nn.Module | None:
        """The EMA of the student's weights (a student of the same family), or None without ``optim.ema_decay``."""
        return None if self.ema is None else self.ema.module

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def begin(self, state: TrainState, resume_from=None, resume_state: dict | None = None) -> None:
        """Enter the phase the run starts in (the first that has steps) or resumes in (the checkpoint's: its optimizer
        is that phase's), and restore the checkpoint."""
        state.phase = resume_state.get("phase", 0) if resume_from is not None else \
            next((i for i, p in enumerate(self.phases) if p.steps > 0), len(self.phases) - 1)
        self._start(self.phases[state.phase])
        if resume_from is None and self.num_classes and self.accelerator.num_processes > 1:
            # Each rank draws its own Mixup/CutMix coefficients (numpy's generator) and drop-path masks (torch's),
            # as the authors' seed + rank; the student is built by then, and checkpoints keep each rank's state.
            import numpy as np

            seed = self.run.seed + self.accelerator.process_index
            np.random.seed(seed)
            torch.manual_seed(seed)
        if self.optim.ema_decay is not None:
            from timm.utils import ModelEmaV3

            # Of every parameter and buffer (frozen ones stay as they are), kept on the student's device.
            self.ema = ModelEmaV3(self.student, decay=self.optim.ema_decay)
        if self.lr_scale != 1:
            self.say(f"learning rates x {self.lr_scale:g} (the global batch {self.global_batch} / optim.lr_base_batch "
                     f"{self.optim.lr_base_batch}): lr {self.optim.lr * self.lr_scale:.4g}")
        if resume_from is not None:
            load_checkpoint(self.accelerator, resume_from, state, self.model, self.optimizer, self.scheduler,
                            ema=None if self.ema is None else self.ema.module)
            self.say(f"resumed from {resume_from} (step {state.step}, phase {self.phases[state.phase].name}, epoch "
                     f"{state.epoch}, batch {state.batch_in_epoch} of the epoch)")

    def _start(self, phase: Phase) -> None:
        """The phase's trainable parameters, a fresh optimizer and schedule, and the module that trains (wrapped
        anew, so that DDP sees exactly the parameters this phase trains)."""
        o = self.optim
        self.family.enter(self.student, self.policy, phase)
        module = TrainingForward(self.student, self.family.forward, phase.outputs, self.pre_logits)
        lr = phase.lr * self.lr_scale
        groups = layer_decay_param_groups(module, o.weight_decay, o.layer_decay) if o.layer_decay is not None \
            else optimizer_param_groups(module, o.weight_decay)
        for group in groups:
            group["lr"] = lr * group.pop("lr_scale", 1.0)
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps)
        if o.schedule == "timm_cosine":
            warmup_lr, min_lr = o.warmup_lr * self.lr_scale, phase.min_lr * self.lr_scale

            def factor(s):  # of each group's rate (its layer-decay scale kept)
                return timm_cosine(s, phase.warmup_steps, phase.steps, lr, warmup_lr, min_lr) / lr
        else:
            def factor(s):
                return warmup_cosine(s, phase.warmup_steps, phase.steps, phase.min_lr / phase.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(module, opt, sched)
        self.model.train()

    def phase(self, state: TrainState) -> Phase:
        """The phase of the next step (entering the next phase where this one is over)."""
        while state.step >= sum(p.steps for p in self.phases[:state.phase + 1]) and state.phase + 1 < len(self.phases):
            state.phase += 1
            if self.phases[state.phase].steps:
                self._start(self.phases[state.phase])
                self.say(f"step {state.step}: phase {self.phases[state.phase].name} "
                         f"({self.phases[state.phase].steps} steps)")
        return self.phases[state.phase]

    def save(self, state: TrainState):
        """A checkpoint of the phase's module, optimizer and schedule; a student whose weights are no longer finite
        (the training diverged) is never checkpointed: the run stops, keeping its last good checkpoint."""
        bad = [name for name, p in self.student.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"step {state.step}: {len(bad)} student weight tensor(s) are not finite (e.g. {bad[0]}): the training "
                f"diverged; the last good checkpoint is in {self.checkpoints}. Lower optim.lr, raise "
                f"optim.warmup_steps or set optim.grad_clip, then resume from it (run.resume=CHECKPOINT) or start "
                f"anew (run.resume=none)")
        return save_checkpoint(self.accelerator, self.checkpoints, state, self.run.keep_checkpoints, self.model,
                               self.optimizer, self.scheduler, ema=None if self.ema is None else self.ema.module)

    def step(self, state: TrainState, next_batch: Callable[[], tuple[Tensor, dict]], targets) -> StepResult:
        """One optimizer step of the current phase (``next_batch()`` gives each micro-batch, ``targets.targets(images,
        extras, needs)`` the teacher's targets); ``state`` moves on by a step. Too many non-finite steps in a row stop
        the run with a checkpoint."""
        phase = self.phase(state)
        result = self._step(state.step, phase, next_batch, targets)
        if result.grad_norm is not None:
            self.grad_norm = result.grad_norm
        state.step += 1
        state.samples_seen += self.global_batch
        if not result.skipped:
            state.nonfinite_in_row = 0
            return result
        state.nonfinite_total += 1
        state.nonfinite_in_row += 1
        self.say(f"step {state.step - 1}: non-finite loss or gradient, step skipped ({state.nonfinite_in_row} in a "
                 f"row, {state.nonfinite_total} in all)")
        if state.nonfinite_in_row >= self.run.max_nonfinite:
            path = self.save(state)
            raise NonFiniteLossError(
                f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient (run.max_nonfinite="
                f"{self.run.max_nonfinite}); stopped at step {state.step}, checkpoint {path}. Lower optim.lr, raise "
                f"optim.warmup_steps, set optim.grad_clip, or use mixed_precision bf16 instead of fp16; then resume "
                f"with run.resume={path}")
        return result

    def _step(self, step: int, phase: Phase, next_batch: Callable[[], tuple[Tensor, dict]], targets) -> StepResult:
        acc, model, device = self.accelerator, self.model, self.accelerator.device
        ga = self.optim.grad_accum
        result = StepResult(sums={name: torch.zeros((), device=device)
                                  for name in ("loss", "cos", *(t.name for t in phase.terms))})
        for micro in range(ga):
            tw = time.perf_counter()
            images, extras = next_batch()
            result.wait += time.perf_counter() - tw
            images = images.to(device, non_blocking=True)
            labels = None
            if phase.needs_labels:
                # objective.labels checks every label (its head needs them all); the zero-shot term of
                # loss.label_weight alone (bootstrap.labels) skips samples without a class (-1).
                labels = self._labels(extras) if self.num_classes else extras["cls"]
                labels = labels.to(device, non_blocking=True)
                if self.mix is not None:
                    images, labels = self._mixed(images, labels)
            with acc.autocast(), torch.no_grad():
                target = targets.targets(images, extras, phase.needs)  # of the mixed images, as DeiT distils
            if labels is not None:
                target = {**target, "labels": labels}
            sync = acc.no_sync(model) if micro < ga - 1 else contextlib.nullcontext()
            with sync:
                output = model(images)
                terms = {t.name: t.fn(output, target) for t in phase.terms}
                loss = sum(t.weight * terms[t.name] for t in phase.terms)
                if step in self.inject:
                    loss = loss * float("nan")
                # Every rank must take the same decision, or DDP's gradient all-reduce would hang.
                bad = torch.tensor(float(not torch.isfinite(loss)), device=device)
                if acc.num_processes > 1:
                    bad = acc.reduce(bad, "sum")
                if bad.item() > 0:
                    result.skipped = True
                    break
                acc.backward(loss / ga)
            result.sums["loss"] += loss.detach()
            for name, value in terms.items():
                result.sums[name] += value.detach()
            if "embedding" in output and "embedding" in target:
                result.sums["cos"] += batch_cosine(output["embedding"].detach(), target["embedding"])
        if not result.skipped:
            if self.optim.grad_clip is not None:
                grad_norm = acc.clip_grad_norm_(model.parameters(), self.optim.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]))
            result.grad_norm = float(grad_norm)
            # With fp16 the gradient scaler skips steps with inf gradients itself (and lowers the scale).
            if not math.isfinite(result.grad_norm) and self.run.mixed_precision != "fp16":
                result.skipped = True
            else:
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.student)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # skipped steps count: the schedule is a function of the step number
        return result

    def _labels(self, extras: dict) -> Tensor:
        """The batch's labels, checked on every rank together: a rank that stopped alone would leave the others
        waiting in DDP's all-reduce."""
        acc, failed = self.accelerator, None
        try:
            labels = batch_labels(extras, self.num_classes)
        except LabelError as exc:
            failed = exc
        if acc.num_processes > 1:
            bad = acc.reduce(torch.tensor(float(failed is not None), device=acc.device), "sum")
            if bad.item() > 0 and failed is None:
                raise LabelError("another process met a sample whose label cannot be used (its error names it)")
        if failed is not None:
            raise failed
        return labels

    def _mixed(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """timm's Mixup/CutMix of the batch (in place) and its soft, label-smoothed targets."""
        if images.dim() != 4 and (self.mix.cutmix_alpha > 0 or self.mix.cutmix_minmax is not None):
            raise UserError(f"CutMix cuts boxes out of images [B, 3, H, W]; this batch is {tuple(images.shape)} (video "
                            f"clips): set objective.cutmix=0 (Mixup mixes clips whole)")
        return self.mix(images, labels)
