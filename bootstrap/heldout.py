"""The held-out check: a fixed set of held-out images (or clips), the teacher's embeddings of them, and the
student's fidelity to those (cosine, centred cosine, retrieval) at the start, every `run.eval_every` steps and at
the end, logged and drawn (`alignment.png`); in a run with labels also the top-1 and top-5 accuracy of the student's
head (and of its EMA) on their labels (`accuracy.png`). A run without a teacher checks the accuracy alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from eval.fidelity import fidelity
from eval.metrics import topk_accuracy
from data.decode import DEFAULT_MAX_PIXELS
from data.outputs import write_bytes

from .stepper import NonFiniteLossError

__all__ = ["HeldoutCheck", "embed_all", "format_result", "load_heldout", "plot_accuracy", "plot_alignment"]


def load_heldout(shards, teacher, limit: int, allow_pipe: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, media=None, labels: bool = False, image_view=None):
    """The first `limit` images (or clips: `media`, `data.media`) of `shards` in shard order, in the teacher's
    evaluation view (``image_view``: the images' view in a run without a teacher): the fixed held-out set, the
    ``shard#key`` of each, and with ``labels`` their classes (long, -1 where a sample has none)."""
    from data.media import ImageMedia

    media = media or ImageMedia()
    if teacher is None:
        if media.video or image_view is None:
            raise ValueError("a held-out set without a teacher takes images in the student's own view (image_view)")
        transform = image_view
    else:
        transform = media.eval_transform(teacher.preprocess, teacher.eval_transform())
    return media.first_samples(shards, transform, limit, allow_pipe, max_pixels, labels=labels)


@torch.no_grad()
def embed_all(fn, images: Tensor, batch_size: int, device, autocast) -> Tensor:
    out = []
    for start in range(0, images.shape[0], batch_size):
        with autocast():
            out.append(fn(images[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def _plot_over_steps(history: list[dict], series, ylabel: str, title: str, path: Path, low: float = 0.0) -> None:
    """A PNG of the logged held-out values ``series`` (``(key, label, style kwargs)``) over the steps that have
    the first one; a series some of them lack is left out."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [h for h in history if series[0][0] in h]
    if not points:
        return
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in series:
        if all(key in p for p in points):
            ax.plot(steps, [p[key] for p in points], marker="o", label=label, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(min(low, *(v for key, _, _ in series for p in points for v in [p.get(key, low)])), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def plot_alignment(history: list[dict], path: Path) -> None:
    """alignment.png: held-out cosine, centred cosine and retrieval over steps."""
    _plot_over_steps(history, [("heldout/cosine", "cosine", {}), ("heldout/centred_cosine", "centred cosine", {}),
                               ("heldout/retrieval_top1", "retrieval top-1", {})],
                     "student vs teacher (held-out)", "held-out alignment", path)


def plot_accuracy(history: list[dict], path: Path) -> None:
    """accuracy.png: held-out top-1 and top-5 of the student (and of its EMA) over steps."""
    student, ema = {"color": "tab:blue"}, {"color": "tab:green"}
    _plot_over_steps(history, [("heldout/top1", "top-1", student), ("heldout/top5", "top-5", {**student, "ls": ":"}),
                               ("heldout/ema_top1", "EMA top-1", ema),
                               ("heldout/ema_top5", "EMA top-5", {**ema, "ls": ":"})],
                     "held-out accuracy", "held-out accuracy of the student's head", path)


def format_result(result: dict) -> str:
    parts = []
    if "cosine" in result:
        parts.append(f"cosine {result['cosine']:.4f}, centred cosine {result['centred_cosine']:.4f}, "
                     f"retrieval top-1 {result['retrieval_top1']:.3f} (chance {result['retrieval_chance']:.3f})")
    for prefix, who in (("", "top-1"), ("ema_", "EMA top-1")):
        if f"{prefix}top1" in result:
            top5 = f" (top-5 {result[f'{prefix}top5']:.3f})" if f"{prefix}top5" in result else ""
            parts.append(f"{who} {result[f'{prefix}top1']:.3f}{top5}")
    return "; ".join(parts)


class HeldoutCheck:
    """The student against the teacher's held-out targets (``targets``; None without a teacher) and, with
    ``labels``, its head's accuracy on them (and its EMA's), logged (`metrics`) and drawn (`alignment.png`). Every
    rank runs it (each holds the whole student); the main process logs it. A student whose held-out outputs are
    not finite has diverged: the run stops there, before its next checkpoint, keeping the last good one."""

    def __init__(self, images: Tensor, targets: Tensor | None, batch_size: int, accelerator, pre_logits: bool, metrics,
                 picture: Path, checkpoints: Path, labels: Tensor | None = None):
        self.images, self.targets, self.batch_size, self.pre_logits = images, targets, batch_size, pre_logits
        self.accelerator, self.metrics, self.picture, self.checkpoints = accelerator, metrics, picture, checkpoints
        self.labels = labels

    def _outputs(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """The aligned outputs and the head's logits of the held-out images, from one pass each."""
        was_training = model.training
        model.eval()
        try:
            both = embed_all(lambda x: torch.cat(model.forward_outputs(x), dim=1), self.images, self.batch_size,
                             self.accelerator.device, self.accelerator.autocast)
        finally:
            model.train(was_training)
        width = model.num_features
        pre, out = both[:, :width], both[:, width:]
        return (pre if self.pre_logits else out), out

    def __call__(self, student: nn.Module, step: int, ema: nn.Module | None = None) -> dict:
        aligned, logits = self._outputs(student)
        if not (torch.isfinite(aligned).all() and torch.isfinite(logits).all()):
            raise NonFiniteLossError(
                f"step {step}: the student's held-out outputs are not finite (the training diverged); the last "
                f"good checkpoint is in {self.checkpoints}. Lower optim.lr, raise optim.warmup_steps or set "
                f"optim.grad_clip, then resume from it (run.resume=CHECKPOINT) or start anew (run.resume=none)")
        result = fidelity(aligned, self.targets) if self.targets is not None else {}
        if self.labels is not None:
            result.update(topk_accuracy(logits, self.labels))
            if ema is not None:
                result.update({f"ema_{k}": v for k, v in topk_accuracy(self._outputs(ema)[1], self.labels).items()})
        self.metrics.log(step, {f"heldout/{k}": v for k, v in result.items()})
        if self.accelerator.is_main_process and self.targets is not None:
            plot_alignment(self.metrics.history(), self.picture)
        if self.accelerator.is_main_process and self.labels is not None:
            plot_accuracy(self.metrics.history(), self.picture.with_name("accuracy.png"))
        return result

    def logged(self) -> tuple[dict | None, dict | None]:
        """The first and the latest check in the log (of a resumed run), on the main process."""
        logged = [h for h in self.metrics.history() if any(k.startswith("heldout/") for k in h)] \
            if self.accelerator.is_main_process else []
        checks = [{k.removeprefix("heldout/"): v for k, v in h.items() if k.startswith("heldout/")} for h in logged]
        return (checks[0], checks[-1]) if checks else (None, None)
