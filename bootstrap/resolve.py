"""Resolve, then run: everything a run derives from its recipe, decided once, before any training step.

`resolve_run(recipe, accelerator)` turns the loaded recipe into the run's resolved recipe and its facts:

* the demo's data and teacher (made or found in the cache) fill what a demo recipe leaves empty;
* a video student's image student given as a run folder (``student.video.image_student``) is checked and named
  by its weights file;
* the data is checked (`bootstrap.launch.check_data`); a run with labels reads the training data's class
  names (`data.labels.shard_classnames`: labelled shards, or one line naming the shard folder and key);
* a schedule in epochs (``optim.epochs``) becomes steps, from the data's size and the global batch;
* what the output folder holds: the checkpoint to resume from, whether its recipe is this one
  (`bootstrap.resume`), whether the run already finished; a run started anew sets old checkpoints aside;
* the teacher is built (a run with labels alone may have none); a random-weight teacher's weights are saved in the run folder and the resolved
  recipe names them, so that `recipe.yaml` rebuilds this very teacher in a fresh process (evaluation,
  export, a resumed run);
* the student family (`students.families`), from the `student:` section;
* `recipe.yaml` (the resolved recipe) is written.

The run, the target cache and the target source read the resolved recipe only; nothing writes into a recipe.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from students.family import StudentFamily
from students.run_folder import RunFolder

from .checkpoint import read_manifest, resolve_resume
from .config import Recipe, RecipeError
from .launch import check_data
from .resume import check_same_recipe, finished_summary, set_aside_old_checkpoints

__all__ = ["ResolvedRun", "resolve_run", "with_demo", "with_teacher_weights"]


@dataclass(frozen=True)
class ResolvedRun:
    """A recipe resolved for one run (see the module docstring)."""

    recipe: Recipe
    folder: RunFolder
    resume_from: Path | None = None  # the checkpoint this run continues, if any
    resume_state: dict | None = None  # its train state (step, phase, data position)
    finished: dict | None = None  # the summary of a run that already ended (nothing is to be done)
    classnames: list[str] | None = None  # the training data's classes, for a run with labels

    @property
    def family(self) -> StudentFamily:
        return self.recipe.family

    @property
    def total_steps(self) -> int:
        return self.family.steps(self.recipe.student, self.recipe.optim)

    @property
    def checkpoints(self) -> Path:
        return self.folder.file(RunFolder.CHECKPOINTS)


def with_demo(recipe: Recipe, accelerator, verbose: bool) -> Recipe:
    """The recipe with the demo's data and teacher where a demo recipe leaves them empty (the main process makes
    or finds them; the others then find them cached)."""
    if recipe.demo is None:
        return recipe
    from .demo_teacher import prepare_demo

    with accelerator.main_process_first():
        return prepare_demo(recipe, verbose=verbose)


def training_classnames(recipe: Recipe) -> list[str] | None:
    """The class names of the training data of a run with labels (its shards' dataset.json), checked against the
    held-out set's (where it has some) and the student's head size where the recipe gives one; None for a run
    without labels."""
    from data.labels import LabelError, check_same_classes, shard_classnames

    d, o = recipe.data, recipe.objective
    if not o.labels:
        return None
    try:
        names = shard_classnames(d.train, d.allow_pipe, "data.train")
    except LabelError as exc:
        raise RecipeError(str(exc)) from None
    if d.val is not None:
        try:
            val = shard_classnames(d.val, d.allow_pipe, "data.val")
        except LabelError as exc:  # unlabelled held-out images: the held-out check is the alignment alone
            if not recipe.teacher:
                raise RecipeError(f"{exc}; without a teacher the held-out check measures the accuracy on data.val's "
                                  f"labels alone: give labelled val shards, or leave data.val out") from None
            val = None
        if val is not None:
            try:
                check_same_classes(names, val, "data.train's dataset.json", "data.val's")
            except LabelError as exc:
                raise RecipeError(f"{exc}: the held-out accuracy compares the two") from None
    wanted = getattr(recipe.student, "num_classes", None)
    if wanted is not None and wanted != len(names):
        raise RecipeError(f"student.num_classes={wanted} and the training data lists {len(names)} classes (data.train's "
                          f"dataset.json): leave student.num_classes out, the head then has the data's classes")
    return names


def with_steps(recipe: Recipe, world_size: int) -> Recipe:
    """The recipe with optim.steps and optim.warmup_steps from optim.epochs and optim.warmup_epochs (the
    optimizer steps of that many passes over the training data, data.epoch_samples or its size)."""
    from data.shards import resolve_shards, shard_sample_counts
    from data.stream import batches_per_rank

    o, d = recipe.optim, recipe.data
    if o.epochs is None:
        return recipe
    samples = d.epoch_samples
    if samples is None:
        counts = shard_sample_counts(resolve_shards(d.train, d.allow_pipe))
        if any(c is None for c in counts):
            raise RecipeError("optim.epochs needs the size of an epoch: the sample counts of data.train are unknown "
                              "(no dataset.json beside the shards); set data.epoch_samples, or optim.steps")
        samples = sum(counts)
    per_epoch = batches_per_rank(samples, world_size, d.batch_size) / o.grad_accum
    steps, warmup = int(o.epochs * per_epoch), int((o.warmup_epochs or 0) * per_epoch)
    if steps < 1:
        raise RecipeError(f"optim.epochs={o.epochs} is less than one optimizer step ({per_epoch:g} per epoch)")
    return recipe.replace(optim=dataclasses.replace(o, steps=steps, warmup_steps=warmup))
def with_image_student(recipe: Recipe) -> Recipe:
    """The recipe whose ``student.video.image_student`` names a weights file: a finished run folder given there is
    checked (finished, the same teacher) and resolved to its ``student.safetensors``."""
    from data.targets import teacher_identity
    from students.run_folder import NotARunError, RunFolderError
    from students.video import video_options

    from .image_stage import is_recipe_spec

    video = video_options(recipe.student)
    if video is not None and is_recipe_spec(video.image_student):
        raise RecipeError(f"student.video.image_student={video.image_student!r} names a recipe, which bootstrap/run.py "
                          f"trains first (bootstrap.image_stage); started otherwise, a run needs that run's folder "
                          f"there: run bootstrap/run.py, or give the finished image run's folder")
    if video is None or not video.image_student or not Path(video.image_student).expanduser().is_dir():
        return recipe
    try:
        folder = RunFolder.finished(Path(video.image_student).expanduser())
        spec = folder.teacher_spec()
    except (NotARunError, RunFolderError) as exc:
        raise RecipeError(f"student.video.image_student: {exc}") from None
    if teacher_identity(spec) != teacher_identity(recipe.teacher):
        raise RecipeError(f"student.video.image_student: the run {folder.path} learned from teacher "
                          f"{spec.get('kind')}:{spec.get('model')}, not this recipe's {recipe.teacher.get('kind')}:"
                          f"{recipe.teacher.get('model')}: use that run's teacher section, or another run")
    weights = str(folder.file(RunFolder.STUDENT_WEIGHTS).resolve())
    student = dataclasses.replace(recipe.student, video=dataclasses.replace(video, image_student=weights))
    return recipe.replace(student=student)


def with_teacher_weights(recipe: Recipe, path: Path) -> Recipe:
    """The recipe whose teacher spec names the weights file ``path``."""
    return recipe.replace(teacher={**recipe.teacher, "pretrained": str(path.resolve())})


def build_teacher(recipe: Recipe):
    """The teacher of a resolved recipe, built as every process of the run builds it (after seeding: a random
    teacher's weights are a function of `run.seed`)."""
    from accelerate.utils import set_seed

    from teachers import create_teacher

    set_seed(recipe.run.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return create_teacher(recipe.teacher)


def resolve_run(recipe: Recipe, accelerator, say: Callable[[str], None]) -> tuple[ResolvedRun, Any]:
    """The resolved run and its teacher (None for a run that already finished); see the module docstring."""
    from teachers import resolve_spec

    folder = RunFolder(recipe.run.output_dir)
    main = accelerator.is_main_process
    recipe = with_demo(recipe, accelerator, verbose=main)
    recipe = with_image_student(recipe)
    check_data(recipe)
    classnames = training_classnames(recipe)
    recipe = with_steps(recipe, accelerator.num_processes)

    resume_from = resolve_resume(recipe.run.resume, folder.file(RunFolder.CHECKPOINTS))
    random_teacher = bool(recipe.teacher) and resolve_spec(recipe.teacher)[1] == "random"
    resume_state = None
    if resume_from is not None:
        saved_teacher = resume_from.parent.parent / RunFolder.TEACHER_WEIGHTS
        if random_teacher and saved_teacher.is_file():
            recipe = with_teacher_weights(recipe, saved_teacher)  # the very teacher the run started with
            random_teacher = False
        resume_state = read_manifest(resume_from)["train_state"]
        check_same_recipe(recipe, resume_from, folder.path)
        steps = recipe.family.steps(recipe.student, recipe.optim)
        done = finished_summary(folder, resume_state["step"], steps)
        if done is not None:
            return ResolvedRun(recipe, folder, resume_from, resume_state, finished=done, classnames=classnames), None
    elif main:
        set_aside_old_checkpoints(folder.file(RunFolder.CHECKPOINTS), say)
    accelerator.wait_for_everyone()

    if recipe.teacher:
        teacher = build_teacher(recipe)
    else:  # labels alone: no teacher; the student's initialisation is a function of run.seed all the same
        from accelerate.utils import set_seed

        set_seed(recipe.run.seed)
        teacher = None
    if random_teacher:
        # recipe.yaml must rebuild this very teacher in a fresh process (evaluation, export).
        path = folder.file(RunFolder.TEACHER_WEIGHTS)
        if main:
            folder.write_teacher_weights(teacher)
        recipe = with_teacher_weights(recipe, path)
    if main:
        folder.write_recipe(recipe.to_yaml())
    accelerator.wait_for_everyone()
    return ResolvedRun(recipe, folder, resume_from, resume_state, classnames=classnames), teacher
