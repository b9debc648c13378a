"""What a run logs: metrics.jsonl and TensorBoard (through accelerate's tracker), main process only, and the
running sums of the steps between two log lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from data.outputs import open_append, write_text

__all__ = ["LogWindow", "MetricsLog"]


class MetricsLog:
    """metrics.jsonl and TensorBoard (through accelerate's tracker), main process only."""

    def __init__(self, accelerator, path: Path, resume_step: int | None):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process:
            if resume_step is None:
                write_text(path, "")
            elif path.exists():  # drop what was logged after the checkpoint we resume from
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                write_text(path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open_append(self.path) as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def history(self) -> list[dict]:
        # A run resumed from another folder's checkpoint starts with no log of its own.
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class LogWindow:
    """The running sums of the optimizer steps since the last log line: each loss term's mean, the share of the
    time spent waiting for data, images per second."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0
        self.time = self.wait = 0.0
        self.images = 0

    def add(self, result, grad_accum: int, seconds: float, images: int) -> None:
        """One optimizer step (`bootstrap.stepper.StepResult`); a skipped step adds its time, not its losses."""
        if not result.skipped:
            for name, value in result.sums.items():
                self.sums[name] = self.sums.get(name, 0.0) + value.item() / grad_accum
            self.n += 1
        self.time += seconds
        self.wait += result.wait
        self.images += images

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.time, 1e-9)

    @property
    def wait_fraction(self) -> float:
        return self.wait / max(self.time, 1e-9)

    def line(self, phase, state, stepper) -> dict:
        """The log line of the steps since the last one."""
        return {**self.losses(phase, stepper.accelerator), "train/lr": stepper.scheduler.get_last_lr()[0],
                "train/img_per_s": self.images_per_s, "train/data_wait_frac": self.wait_fraction,
                "train/grad_norm": stepper.grad_norm, "train/epoch": state.epoch, "train/phase": state.phase,
                "train/nonfinite_total": state.nonfinite_total}

    def losses(self, phase, accelerator) -> dict:
        """The log line's losses (averaged over the ranks): every phase's line has the same keys; a window of
        skipped steps only logs NaN losses."""
        n = max(self.n, 1)
        names = ["loss", "cos", *(t.name for t in phase.terms)]
        stats = torch.tensor([self.sums[k] / n if k in self.sums else float("nan") for k in names],
                             device=accelerator.device)
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, "mean")
        return {("train/cosine" if k == "cos" else f"train/{k}"): stats[i].item() for i, k in enumerate(names)
                if k != "cos" or "embedding" in phase.needs}
