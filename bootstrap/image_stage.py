"""A video student's image stage, trained by the same command when ``student.video.image_student`` names a recipe.

SparseFormer's video models start from an image SparseFormer, inflated; a video student here starts from its
image student the same way. ``student.video.image_student`` takes a finished image run (its folder or its
``student.safetensors``), or a recipe with overrides, written as on the command line::

    student:
      video:
        frames: 8
        image_student: recipes/demo.yaml student.conv_dim=16 run.output_dir=runs/demo_video_image

Then `bootstrap.run` makes sure that recipe's run is finished before the video run starts: it trains it (report
and export included) when its ``run.output_dir`` holds no finished run, resumes it when that folder holds an
unfinished one, and leaves a finished one as it is; the video run then inflates its student. The image recipe
must build the same student from the same teacher (an image student of another construction cannot be inflated
into this one) with the same ``run.mixed_precision`` (one process trains both), and write elsewhere; each mismatch
is one line naming the key, found before anything is trained. It runs with this command's ``run.cpu_threads`` and
``run.progress`` and, for a demo, in this recipe's ``demo.cache_dir`` unless it names its own; anything else is
the image recipe's own (give it after the recipe). A recipe path is read as given, else next to the video recipe
(``demo.yaml`` beside ``recipes/demo_video.yaml``).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

from .config import Recipe, RecipeError, load_recipe

__all__ = ["ImageStage", "image_stage", "is_recipe_spec"]

RECIPE_SUFFIXES = (".yaml", ".yml")


def is_recipe_spec(value: str | None) -> bool:
    """Whether an ``image_student`` value names a recipe (its first word ends in .yaml or .yml)."""
    if not value:
        return False
    try:
        words = shlex.split(value)
    except ValueError:
        return False
    return bool(words) and words[0].lower().endswith(RECIPE_SUFFIXES)


@dataclass(frozen=True)
class ImageStage:
    """The image recipe of a video recipe, and the video recipe that inflates that recipe's run."""

    spec: str
    image: Recipe
    video: Recipe

    @property
    def folder(self) -> Path:
        return Path(self.image.run.output_dir)


def image_stage(recipe: Recipe, recipe_path: str | Path | None = None) -> ImageStage | None:
    """The image stage of ``recipe`` (None unless its ``student.video.image_student`` names a recipe), checked."""
    from students.video import video_options

    video = video_options(recipe.student)
    if video is None or not is_recipe_spec(video.image_student):
        return None
    spec = video.image_student
    key = "student.video.image_student"
    words = shlex.split(spec)
    path = Path(words[0]).expanduser()
    if not path.is_file() and recipe_path is not None and not path.is_absolute():
        beside = Path(recipe_path).parent / path.name
        path = beside if beside.is_file() else path
    if not path.is_file():
        raise RecipeError(f"{key}: recipe {words[0]} does not exist (give a recipe file, with key=value overrides "
                          f"after it, or a finished image run folder)")
    try:
        image = load_recipe(path, words[1:])
    except RecipeError as exc:
        raise RecipeError(f"{key}: {words[0]}: {exc}") from None
    image = _runs_like(image, recipe)
    _check_fits(recipe, image, key, words[0])
    video_recipe = recipe.replace(student=dataclasses.replace(
        recipe.student, video=dataclasses.replace(video, image_student=str(Path(image.run.output_dir)))))
    return ImageStage(spec, image, video_recipe)


def _runs_like(image: Recipe, recipe: Recipe) -> Recipe:
    """The image recipe run as this command runs: its CPU threads and progress bars (how the machine runs, not what
    is trained), and for a demo this recipe's cache (where the demo teacher is) unless the image recipe names one."""
    image = image.replace(run=dataclasses.replace(image.run, cpu_threads=recipe.run.cpu_threads,
                                                  progress=recipe.run.progress))
    if image.demo is not None and recipe.demo is not None and image.demo.cache_dir is None:
        image = image.replace(demo=dataclasses.replace(image.demo, cache_dir=recipe.demo.cache_dir))
    return image


def _check_fits(recipe: Recipe, image: Recipe, key: str, name: str) -> None:
    """The image recipe builds this recipe's student, from its teacher, in the same precision, into another folder."""
    from students.video import video_options

    if video_options(image.student) is not None:
        raise RecipeError(f"{key}: {name} makes a video student (student.video): name an image recipe")
    if type(image.student) is not type(recipe.student):
        raise RecipeError(f"{key}: {name} trains a {image.family.name} student, and this recipe a {recipe.family.name} "
                          f"one: name a recipe of the same student kind")
    ours = dataclasses.asdict(dataclasses.replace(recipe.student, video=None))
    theirs = dataclasses.asdict(image.student)
    differ = [k for k in ours if ours[k] != theirs.get(k)]
    if differ:
        shown = ", ".join(f"student.{k} ({theirs.get(k)!r} there, {ours[k]!r} here)" for k in differ[:3])
        raise RecipeError(f"{key}: {name} builds another student: {shown}; add "
                          + " ".join(f"student.{k}={_yaml(ours[k])}" for k in differ[:3])
                          + " after the recipe, so that its image student inflates into this one")
    if image.teacher or recipe.teacher:
        if dict(image.teacher or {}) != dict(recipe.teacher or {}):
            raise RecipeError(f"{key}: {name} learns from another teacher than this recipe: give both the same "
                              f"teacher section")
    else:  # both take the demo's teacher: the same one when their demo sections (images and teacher) agree
        if recipe.demo is None or image.demo is None or \
                dataclasses.replace(recipe.demo, video=None) != dataclasses.replace(image.demo, video=None):
            raise RecipeError(f"{key}: {name} has another demo section (its images or teacher): give both the same "
                              f"demo settings")
    if image.run.mixed_precision != recipe.run.mixed_precision:
        raise RecipeError(f"{key}: {name} has run.mixed_precision={image.run.mixed_precision} and this recipe "
                          f"{recipe.run.mixed_precision}: one process trains both; add run.mixed_precision="
                          f"{recipe.run.mixed_precision} after the recipe")
    if Path(image.run.output_dir).resolve() == Path(recipe.run.output_dir).resolve():
        raise RecipeError(f"{key}: {name} writes to {image.run.output_dir}, this run's folder: add "
                          f"run.output_dir=ANOTHER_FOLDER after the recipe")


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
