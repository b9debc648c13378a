"""The held-out alignment check: a fixed set of held-out images (or clips), the teacher's embeddings of them, and the
student's fidelity to those (cosine, centred cosine, retrieval) at the start, every `run.eval_every` steps and
at the end, logged and drawn (`alignment.png`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from eval.fidelity import fidelity
from data.decode import DEFAULT_MAX_PIXELS
from data.outputs import write_bytes

from .stepper import NonFiniteLossError

__all__ = ["HeldoutCheck", "embed_all", "format_result", "load_heldout", "plot_alignment"]


def load_heldout(shards, teacher, limit: int, allow_pipe: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, media=None) -> tuple[Tensor, list[str]]:
    """The first `limit` images (or clips: `media`, `data.media`) of `shards` in shard order, in the teacher's
    evaluation view: the fixed held-out set, and the ``shard#key`` of each."""
    from data.media import ImageMedia

    media = media or ImageMedia()
    transform = media.eval_transform(teacher.preprocess, teacher.eval_transform())
    return media.first_samples(shards, transform, limit, allow_pipe, max_pixels)


@torch.no_grad()
def embed_all(fn, images: Tensor, batch_size: int, device, autocast) -> Tensor:
    out = []
    for start in range(0, images.shape[0], batch_size):
        with autocast():
            out.append(fn(images[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def plot_alignment(history: list[dict], path: Path) -> None:
    """alignment.png: held-out cosine, centred cosine and retrieval over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [h for h in history if "heldout/cosine" in h]
    if not points:
        return
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("heldout/cosine", "cosine"), ("heldout/centred_cosine", "centred cosine"),
                       ("heldout/retrieval_top1", "retrieval top-1")):
        ax.plot(steps, [p[key] for p in points], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("student vs teacher (held-out)")
    ax.set_ylim(min(0.0, *(p["heldout/centred_cosine"] for p in points)), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("held-out alignment")
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def format_result(result: dict) -> str:
    return (f"cosine {result['cosine']:.4f}, centred cosine {result['centred_cosine']:.4f}, "
            f"retrieval top-1 {result['retrieval_top1']:.3f} (chance {result['retrieval_chance']:.3f})")


class HeldoutCheck:
    """The student against the teacher's held-out targets, logged (`metrics`) and drawn (`alignment.png`). Every
    rank runs it (each holds the whole student); the main process logs it. A student whose held-out embeddings are
    not finite has diverged: the run stops there, before its next checkpoint, keeping the last good one."""

    def __init__(self, images: Tensor, targets: Tensor, batch_size: int, accelerator, pre_logits: bool, metrics,
                 picture: Path, checkpoints: Path):
        self.images, self.targets, self.batch_size, self.pre_logits = images, targets, batch_size, pre_logits
        self.accelerator, self.metrics, self.picture, self.checkpoints = accelerator, metrics, picture, checkpoints

    def __call__(self, student: nn.Module, step: int) -> dict:
        was_training = student.training
        student.eval()
        try:
            feats = embed_all(lambda x: student(x, pre_logits=self.pre_logits), self.images, self.batch_size,
                              self.accelerator.device, self.accelerator.autocast)
        finally:
            student.train(was_training)
        if not torch.isfinite(feats).all():
            raise NonFiniteLossError(
                f"step {step}: the student's held-out embeddings are not finite (the training diverged); the last "
                f"good checkpoint is in {self.checkpoints}. Lower optim.lr, raise optim.warmup_steps or set "
                f"optim.grad_clip, then resume from it (run.resume=CHECKPOINT) or start anew (run.resume=none)")
        result = fidelity(feats, self.targets)
        self.metrics.log(step, {f"heldout/{k}": v for k, v in result.items()})
        if self.accelerator.is_main_process:
            plot_alignment(self.metrics.history(), self.picture)
        return result

    def logged(self) -> tuple[dict | None, dict | None]:
        """The first and the latest check in the log (of a resumed run), on the main process."""
        logged = [h for h in self.metrics.history() if "heldout/cosine" in h] \
            if self.accelerator.is_main_process else []
        checks = [{k.removeprefix("heldout/"): v for k, v in h.items() if k.startswith("heldout/")} for h in logged]
        return (checks[0], checks[-1]) if checks else (None, None)
