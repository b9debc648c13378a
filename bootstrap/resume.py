"""What a run folder already holds, and whether this recipe may continue it.

A run resumes only with the recipe that wrote its checkpoint (`RESUME_SAFE_KEYS` may change: where
and how it runs, not what it computes); a finished run says so and changes nothing; a run started
anew in a folder with checkpoints keeps them, set aside.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from students.run_folder import RunFolder

from .checkpoint import list_checkpoints
from .config import Recipe, RecipeError

__all__ = ["RESUME_SAFE_KEYS", "check_same_recipe", "finished_summary", "recipe_differences",
           "set_aside_old_checkpoints"]


# Keys that may change when a run resumes: where and how it runs, not what it computes.
RESUME_SAFE_KEYS = ("run.resume", "run.stop_after", "run.progress", "run.cpu_threads", "run.log_sample_keys",
                    "run.final_report", "run.keep_checkpoints", "run.log_every", "run.eval_every",
                    "run.checkpoint_every", "run.max_nonfinite", "run.output_dir", "data.num_workers",
                    "data.eval_batch_size", "data.allow_pipe", "demo.cache_dir", "eval", "export", "name")


def recipe_differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, saved, now)`` for every leaf that differs, outside `RESUME_SAFE_KEYS`."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        where = f"{prefix}{key}"
        if where in RESUME_SAFE_KEYS:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, where + ".")
        elif a != b:
            out.append((where, a, b))
    return out


def check_same_recipe(recipe: Recipe, checkpoint: Path, out: Path) -> None:
    """A run resumes only with the recipe that wrote its checkpoint (up to `RESUME_SAFE_KEYS`)."""
    import yaml

    saved_path = checkpoint.parent.parent / RunFolder.RECIPE
    if not saved_path.is_file():
        return  # a checkpoint outside a run folder: its weights are checked against the model on load
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{saved_path} is not valid YAML ({exc}); it describes the checkpoint being resumed") from None
    saved = _with_defaults(saved)
    now = recipe.to_dict()
    if _same_saved_teacher(saved.get("teacher", {}).get("pretrained"), now.get("teacher", {}).get("pretrained")):
        saved["teacher"]["pretrained"] = now["teacher"]["pretrained"]  # a copied run folder names its own copy
    diffs = recipe_differences(saved, now)
    if diffs and checkpoint.parent.parent.resolve() != out.resolve():
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs[:8])
        raise RecipeError(f"run.resume={checkpoint} is a checkpoint of another recipe ({saved_path}): {shown}. Resume "
                          f"it with that recipe, or start anew (run.resume=none)")
    if diffs:
        shown = "; ".join(f"{k}: {a!r} in {saved_path}, {b!r} now" for k, a, b in diffs[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise RecipeError(
            f"{out} holds a run of another recipe, so it cannot be resumed with this one: {shown}{more}. Use another "
            f"run.output_dir for the new recipe, or run.resume=none to start {out} anew (its checkpoints are "
            f"kept aside), or resume with the saved recipe: accelerate launch bootstrap/run.py {saved_path}")


def _with_defaults(saved: Any) -> Any:
    """A saved recipe as this version reads it: keys added since it was saved take their defaults (which
    compute what the run computed then), so that they are no difference. A recipe this version cannot read is
    compared as written."""
    from data.schema import load

    try:
        return load(Recipe, saved, "", error=RecipeError, dotted=True).to_dict()
    except (RecipeError, TypeError):
        return saved


def _same_saved_teacher(saved: Any, now: Any) -> bool:
    """Both name a run's saved random teacher (teacher_weights.safetensors), the same one or a copy."""
    import filecmp

    if not (isinstance(saved, str) and isinstance(now, str)):
        return False
    a, b = Path(saved), Path(now)
    if a.name != RunFolder.TEACHER_WEIGHTS or b.name != a.name or not b.is_file():
        return False
    return not a.is_file() or filecmp.cmp(a, b, shallow=False)


def finished_summary(out: RunFolder, checkpoint_step: int, steps: int) -> dict | None:
    """The summary of a run that already ended at `steps` (its outputs written), else None."""
    if checkpoint_step < steps or not out.file(RunFolder.STUDENT_WEIGHTS).is_file():
        return None
    summary = out.summary()
    return summary if summary and summary.get("finished") and summary.get("steps") == steps else None


def set_aside_old_checkpoints(ckpt_root: Path, say) -> None:
    """A run started anew (run.resume=none) in a folder with checkpoints keeps them, renamed, so that
    the old run's later steps are never taken for the new run's (run.resume=auto picks the highest)."""
    if not list_checkpoints(ckpt_root):
        return
    aside = ckpt_root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(ckpt_root, aside)
    say(f"run.resume=none: the folder's earlier checkpoints were moved to {aside} (delete it to free the space)")
