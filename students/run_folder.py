"""A bootstrapping run's output folder: what the run writes there, and the one set of checks every reader uses.

    RUN/student.safetensors      the student's weights             (written at the end of the run)
    RUN/student_ema.safetensors  the EMA of its weights             (at the end, with optim.ema_decay)
    RUN/student_config.json      its config (its `family` field)    (at the end)
    RUN/pretrained_cfg.json      its input size, mean, std, ...     (at the end)
    RUN/recipe.yaml              the resolved recipe; its `teacher:` is the teacher spec
    RUN/teacher_weights.safetensors  a random-weight teacher's weights (named by recipe.yaml)
    RUN/train_summary.json       steps, seconds, held-out alignment, skipped samples, ...
    RUN/metrics.jsonl            one line per logged step (and TensorBoard under tb/)
    RUN/checkpoints/step-*/      the checkpoints (`bootstrap.checkpoint`)

The run writes through `RunFolder` (each file as a new file renamed over its name, `data.outputs`: never
half-written, and a symlink there is replaced rather than written through); the evaluation (`python -m eval`,
`eval.compare`), the exports (`python -m students.export`, `python -m students.to_transformers`) read
through `RunFolder.finished`, which checks the folder once, in the same words for all of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from data.errors import UserError
from data.outputs import write_bytes, write_text

__all__ = ["NotARunError", "RunFolder", "RunFolderError", "yaml_problem"]


class NotARunError(UserError, FileNotFoundError):
    """A folder that is not (or not yet) a finished run."""


class RunFolderError(UserError, ValueError):
    """A run folder whose files cannot be used as they are (a recipe that is not YAML, a teacher that cannot be
    rebuilt, ...)."""


def yaml_problem(exn: Exception) -> str:
    """A YAML parse error in one line: the problem and where."""
    problem, mark = getattr(exn, "problem", None), getattr(exn, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exn).split())


def _unset(pretrained: Any) -> bool:
    return pretrained in (None, False, "", "none", "false")


class RunFolder:
    """One run's output folder (see the module docstring)."""

    STUDENT_WEIGHTS = "student.safetensors"
    STUDENT_EMA_WEIGHTS = "student_ema.safetensors"
    STUDENT_CONFIG = "student_config.json"
    PRETRAINED_CFG = "pretrained_cfg.json"
    RECIPE = "recipe.yaml"
    TEACHER_WEIGHTS = "teacher_weights.safetensors"
    SUMMARY = "train_summary.json"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    # What a finished run holds, in the order a reader names what is missing.
    FINISHED = (STUDENT_CONFIG, STUDENT_WEIGHTS, RECIPE)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._recipe: dict | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ writing (the run)
    def write_text(self, name: str, text: str) -> Path:
        path = self.file(name)
        write_text(path, text)
        return path

    def write_recipe(self, text: str) -> Path:
        self._recipe = None
        return self.write_text(self.RECIPE, text)

    def write_student(self, student: nn.Module, state_dict: Mapping[str, Any],
                      ema_state_dict: Mapping[str, Any] | None = None) -> None:
        """student.safetensors, student_config.json and pretrained_cfg.json (each written atomically), and
        student_ema.safetensors where the run kept an EMA of the weights."""
        from safetensors.torch import save

        # Copies: safetensors refuses tensors that share storage (a Sparsifiner with share_inout_proj).
        for name, weights in ((self.STUDENT_WEIGHTS, state_dict), (self.STUDENT_EMA_WEIGHTS, ema_state_dict)):
            if weights is not None:
                tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
                write_bytes(self.file(name), save(tensors, metadata={"format": "pt"}))
        self.write_text(self.STUDENT_CONFIG, student.config.to_json())
        self.write_text(self.PRETRAINED_CFG, json.dumps(getattr(student, "pretrained_cfg", {}), indent=1) + "\n")

    def write_teacher_weights(self, teacher) -> Path:
        """A random-weight teacher's weights (once), so that the run's recipe.yaml can name them."""
        from safetensors.torch import save

        path = self.file(self.TEACHER_WEIGHTS)
        if not path.exists():
            write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in teacher.model.state_dict().items()}))
        return path

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        return self.write_text(self.SUMMARY, json.dumps(summary, indent=1) + "\n")

    # ------------------------------------------------------------------ reading
    @classmethod
    def finished(cls, path: str | os.PathLike, hint: str = "") -> "RunFolder":
        """The folder of a finished run, checked: it exists, holds what a run writes at its end, and its recipe
        is a YAML mapping with a teacher spec. ``hint`` ends the message for a folder that is not a run."""
        folder = cls(path)
        p = folder.path
        if not p.is_dir():
            raise NotARunError(f"run folder {p} does not exist" if not p.exists() else
                               f"{p} is a file, not a run folder")
        missing = [name for name in cls.FINISHED if not folder.file(name).is_file()]
        if missing:
            raise NotARunError(
                f"{p} is not a finished bootstrapping run: missing {', '.join(missing)} (a run writes "
                f"{', '.join(cls.FINISHED[:-1])} and {cls.FINISHED[-1]} at its end){hint}")
        if folder.has_teacher():
            folder.teacher_spec()  # the recipe reads and names a teacher
        return folder

    def recipe(self) -> dict:
        """recipe.yaml as a mapping (read once)."""
        if self._recipe is None:
            import yaml

            path = self.file(self.RECIPE)
            try:
                recipe = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exn:
                raise RunFolderError(f"{path} is not valid YAML: {yaml_problem(exn)}") from None
            if not isinstance(recipe, Mapping):
                raise RunFolderError(f"{path} is not a recipe (a YAML mapping)")
            self._recipe = dict(recipe)
        return self._recipe

    def has_teacher(self) -> bool:
        """Whether the recipe names a teacher (a run that trained with labels alone may have none)."""
        return bool(self.recipe().get("teacher"))

    def teacher_spec(self) -> dict:
        """The recipe's `teacher:` spec."""
        spec = self.recipe().get("teacher")
        if not isinstance(spec, Mapping) or not spec:
            raise RunFolderError(f"{self.file(self.RECIPE)} has no 'teacher:' mapping (the teacher spec: kind, "
                                 f"model, pretrained, ...)")
        return dict(spec)

    def check_teacher_rebuildable(self) -> dict:
        """The teacher spec, if it rebuilds the very teacher the student learned from (it names its weights)."""
        spec = self.teacher_spec()
        if _unset(spec.get("pretrained")):
            raise RunFolderError(
                f"the teacher of {self.path} has random weights (pretrained: {spec.get('pretrained')!r}): rebuilding "
                f"it gives a different teacher than the one the student learned from. Save the teacher's weights and "
                f"set teacher.pretrained to that file in {self.file(self.RECIPE)}, or pass the teacher object itself "
                f"(eval.evaluate(student, teacher, ...), students.export.export_openclip(student, teacher, ...))")
        return spec

    def build_teacher(self):
        """The run's teacher, rebuilt from its spec (`check_teacher_rebuildable` first)."""
        from teachers import create_teacher

        return create_teacher(self.check_teacher_rebuildable())

    def load_student(self) -> nn.Module:
        """The student the run saved, its weights loaded strictly, with its pretrained_cfg (input size, mean, std;
        the class names of a student trained with labels) where the run wrote one."""
        return self._student(self.file(self.STUDENT_WEIGHTS))

    def _student(self, weights: Path) -> nn.Module:
        from .families import load_student

        student = load_student(self.file(self.STUDENT_CONFIG), weights)
        pcfg = self.pretrained_cfg()
        if pcfg is not None:
            student.pretrained_cfg = dict(pcfg)
        return student

    def load_student_ema(self) -> nn.Module | None:
        """The EMA of the student's weights the run saved (student_ema.safetensors), or None where it kept none."""
        path = self.file(self.STUDENT_EMA_WEIGHTS)
        return self._student(path) if path.is_file() else None

    def pretrained_cfg(self) -> dict | None:
        """pretrained_cfg.json (input size, mean, std, ...), or None where the run wrote none (or an empty one)."""
        path = self.file(self.PRETRAINED_CFG)
        if not path.is_file():
            return None
        try:
            pcfg = json.loads(path.read_text()) or None
        except json.JSONDecodeError as exn:
            raise RunFolderError(f"{path} is not valid JSON ({exn}); delete it to take the teacher's "
                                 f"preprocessing") from None
        if pcfg is not None and not isinstance(pcfg, Mapping):
            raise RunFolderError(f"{path} is not a JSON object of input_size, mean, std, ...")
        return pcfg

    def summary(self) -> dict | None:
        """train_summary.json, or None where there is none (or it does not read)."""
        try:
            return json.loads(self.file(self.SUMMARY).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def resolve(self, value):
        """A relative data path of the recipe: from the working directory if it exists there, else from the folder."""
        if isinstance(value, (list, tuple)):
            return [self.resolve(v) for v in value]
        if not isinstance(value, str) or "://" in value or os.path.isabs(value) or os.path.exists(value):
            return value
        candidate = self.path / value
        return str(candidate) if candidate.exists() else value
