"""How a student starts (``student.init``), for every family: from its teacher, from scratch, or from saved weights.

    init: teacher       the family's construction from the teacher (bootstrapping; the default): `StudentFamily.build`
    init: scratch       the family's own initialisation (`StudentFamily.scratch`; SparseFormer: the authors'
                        `srnet_init`) of the architecture ``student.config`` names: a named configuration
                        (``sparseformer_v1_tiny``), a config JSON file, or the config as a mapping; without
                        ``config``, the architecture the teacher gives. A family that cannot start from scratch
                        says so in one line.
    init: NAME          a named configuration with its weights from the file ``student.weights`` (nothing is
                        downloaded)
    init: PATH          fine-tuning: a run folder (its student_config.json, student.safetensors and
                        pretrained_cfg.json), or a weights file (.safetensors, or .pth read with weights_only)
                        of the architecture ``student.config``

Every parameter of a student that does not start from its teacher trains. A student started from scratch for a
run with labels gets a head over the data's classes (``student.num_classes``, filled by the run); any other head
must already have that many classes (one line otherwise). The input size, mean and std the run trains with come
from the teacher, or without one from the student (`StudentStart.pretrained_cfg`): a named configuration's, a run
folder's pretrained_cfg.json, or a config's ``normalization_factor`` at ``student.image_size`` (default 224).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .checkpoints import CheckpointMismatchError, load_checkpoint_strict, load_state_dict_file
from .families import family_of
from .family import ConfigError, StudentFamily, policy_from, read_json
from .run_folder import NotARunError, RunFolder
from .timm_registry import IMAGENET_MEAN_STD

__all__ = ["INIT_SCRATCH", "INIT_TEACHER", "StudentStart", "build_student", "check_init", "init_kind"]

INIT_TEACHER, INIT_SCRATCH = "teacher", "scratch"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def init_kind(family: StudentFamily, init: str) -> str:
    """``teacher``, ``scratch``, ``named`` (a named configuration of the family), ``run`` (a folder) or ``file``."""
    if init in (INIT_TEACHER, INIT_SCRATCH):
        return init
    if _is_named(family, init):
        return "named"
    path = Path(init).expanduser()
    if path.is_dir():
        return "run"
    if path.is_file():
        return "file"
    hint = f" (is it a path? {path} does not exist)" if ("/" in init or init.endswith(WEIGHT_SUFFIXES)) else ""
    raise ConfigError(f"student.init={init!r} is neither teacher, scratch, a named {family.name} configuration, a "
                      f"weights file nor a run folder{hint}")


def check_init(family: StudentFamily, options: Any, has_teacher: bool) -> str:
    """The kind of ``options.init`` (`init_kind`), checked against the other init keys before any model is built
    (a `ConfigError` naming the key and the fix)."""
    kind = init_kind(family, options.init)
    if kind == INIT_TEACHER and not has_teacher:
        raise ConfigError("student.init=teacher builds the student from its teacher, and the recipe has no teacher: "
                          "give a 'teacher:' spec (or a 'demo:' section), or start the student otherwise (student.init: "
                          "scratch, a run folder, or a weights file with student.config)")
    if kind == INIT_SCRATCH and family.scratch is None:
        raise ConfigError(f"student.init=scratch: a {family.name} student cannot start from scratch "
                          f"({family.no_scratch}); use student.init=teacher, or a {family.name} run folder to "
                          f"fine-tune")
    if kind == INIT_SCRATCH and options.config is None and not has_teacher:
        raise ConfigError("student.init=scratch without a teacher needs the architecture: set student.config to a "
                          "named configuration (e.g. sparseformer_v1_tiny), a config JSON file or a mapping")
    if kind in (INIT_TEACHER, "run", "named") and options.config is not None:
        raise ConfigError(f"student.config applies to student.init=scratch or to a weights file; with "
                          f"student.init={options.init} the architecture is {'the teacher' if kind == INIT_TEACHER else 'given'}'s: "
                          f"leave student.config out")
    if kind == "file" and options.config is None:
        raise ConfigError(f"student.init={options.init} is a weights file: set student.config to its architecture (a "
                          f"named configuration, a config JSON file or a mapping), or give the run folder it came from")
    if kind == "named" and not options.weights:
        raise ConfigError(f"student.init={options.init}: set student.weights to the file of its weights (nothing is "
                          f"downloaded); or start it from scratch with student.init=scratch, "
                          f"student.config={options.init}")
    if options.config_overrides is not None and kind not in (INIT_SCRATCH, "file"):
        raise ConfigError("student.config_overrides change the architecture of student.init=scratch or of a weights "
                          "file (student.config); leave them out here")
    if options.weights and kind != "named":
        raise ConfigError("student.weights is the weights file of student.init=NAME (a named configuration); with a "
                          "weights file give it as student.init")
    if isinstance(options.image_size, int) and options.image_size < 8:  # (a budget student's is its resolution)
        raise ConfigError(f"student.image_size must be at least 8 pixels, got {options.image_size}")
    if options.num_classes is not None and options.num_classes < 1:
        raise ConfigError(f"student.num_classes must be at least 1, got {options.num_classes}")
    return kind


@dataclass
class StudentStart:
    """A student as it starts, its parameter policy, and the preprocessing it was made for (None: the teacher's)."""

    student: nn.Module
    policy: Any
    pretrained_cfg: dict | None


def build_student(family: StudentFamily, teacher, options: Any, classnames: Sequence[str] | None = None
                  ) -> StudentStart:
    """The student of ``options`` (see the module docstring). With ``classnames`` (a run with labels) its head
    must predict that many classes (a student from scratch gets such a head), and its pretrained_cfg names them
    (timm's ``label_names``)."""
    kind = check_init(family, options, teacher is not None)
    pcfg = None
    if kind == INIT_TEACHER:
        student, policy = family.build(teacher, options)
    else:
        if kind == INIT_SCRATCH:
            config, pcfg = _architecture(family, teacher, options)
            num_classes = len(classnames) if classnames else options.num_classes
            student = family.scratch(config, num_classes)
        elif kind == "named":
            config, pcfg = family.named(options.init)
            student = _load(family, config, options.weights, f"student.weights={options.weights}",
                            f"the named configuration {options.init}")
        elif kind == "file":
            config, pcfg = _architecture(family, teacher, options)
            student = _load(family, config, options.init, f"student.init={options.init}", "student.config")
        else:
            student, pcfg = _from_run(family, options.init)
        policy = policy_from(student, lambda name: True).apply(student)
    if pcfg is not None:
        student.pretrained_cfg = dict(pcfg)
    if classnames:
        head = getattr(student, "num_classes", None)
        if head != len(classnames):
            raise ConfigError(f"the student's head predicts {head} classes and the training data lists {len(classnames)} "
                              f"class names (its dataset.json): training with labels needs a head over the data's "
                              f"classes; start the student from scratch (student.init=scratch) for a new head, or "
                              f"train on data of the head's {head} classes")
        student.pretrained_cfg = {**getattr(student, "pretrained_cfg", {}), "num_classes": len(classnames),
                                  "label_names": list(classnames)}
    return StudentStart(student, policy, pcfg)


# ----------------------------------------------------------------------------- architectures and weights


def _architecture(family: StudentFamily, teacher, options) -> tuple[Any, dict | None]:
    """The config ``options.config`` names, with ``options.config_overrides``, and its preprocessing (None: the
    teacher's)."""
    value, pcfg = options.config, None
    if value is None:  # init scratch with a teacher: the architecture the teacher gives
        student, _ = family.build(teacher, options)
        value, pcfg = student.config.to_dict(), dict(student.pretrained_cfg)
    elif isinstance(value, str) and _is_named(family, value):
        value, pcfg = family.named(value)
        pcfg = _with_size(pcfg, options.image_size)
    elif isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"student.config={value!r} is neither a named {family.name} configuration nor a config "
                              f"JSON file")
        try:
            value = read_json(str(path))
        except (OSError, ValueError) as exn:
            raise ConfigError(f"student.config={path} is not a config JSON ({exn})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"student.config must be a named configuration, a config JSON file or a mapping, got "
                          f"{type(value).__name__}")
    value = _merged(value, options.config_overrides or {})
    theirs = family_of(value)
    if theirs is not family:
        raise ConfigError(f"student.config is a {theirs.name} config and student.kind is {family.name}: set "
                          f"student.kind: {theirs.name}")
    try:
        config = family.config.from_dict({k: v for k, v in value.items() if k != "family"})
    except (ValueError, TypeError) as exn:
        raise ConfigError(f"student.config does not describe a {family.name}: {exn}") from None
    if pcfg is None and options.config is not None:
        pcfg = _pretrained_cfg_of(config, options.image_size)
    return config, pcfg


def _is_named(family: StudentFamily, name: str) -> bool:
    if family.named is None:
        return False
    try:
        family.named(name)
    except (ValueError, KeyError):
        return False
    return True


def _merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` (a mapping merges into a mapping; any other value replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _pretrained_cfg_of(config, image_size: int | None) -> dict:
    """The preprocessing of a config that has none of its own: its ``normalization_factor`` (mean, std; else
    ImageNet's) at ``image_size`` (default 224), bicubic, crop 0.875 (timm's)."""
    mean, std = getattr(config, "normalization_factor", None) or IMAGENET_MEAN_STD
    size = image_size or 224
    return dict(input_size=(3, size, size), mean=tuple(mean), std=tuple(std), interpolation="bicubic",
                crop_pct=0.875)


def _with_size(pcfg: dict, image_size: int | None) -> dict:
    pcfg = dict(pcfg)
    if image_size is not None:
        pcfg["input_size"] = (3, image_size, image_size)
    return pcfg


def _load(family: StudentFamily, config, weights: str, key: str, architecture: str) -> nn.Module:
    """A model of ``config`` with the weights file ``weights``; weights that do not fit are one line."""
    model = family.new(config)
    try:
        state = load_state_dict_file(weights)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file") from None
    try:
        load_checkpoint_strict(model, state, source=str(weights))
    except CheckpointMismatchError:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        example = (missing or unexpected or shaped)[0]
        raise ConfigError(f"{key} does not fit the {family.name} architecture of {architecture} ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(shaped)} mis-shaped tensors, e.g. {example!r}): give "
                          f"the config those weights were trained with") from None
    return model


def _from_run(family: StudentFamily, path: str) -> tuple[nn.Module, dict | None]:
    """The student of a finished run folder (fine-tuning), of this family, and its preprocessing."""
    folder = RunFolder(path)
    config_file = folder.file(RunFolder.STUDENT_CONFIG)
    try:
        folder = RunFolder.finished(path)
    except NotARunError as exn:
        raise ConfigError(f"student.init={path}: {exn}") from None
    config = json.loads(config_file.read_text())
    theirs = family_of(config)
    if theirs is not family:
        raise ConfigError(f"student.init={path} is a run of a {theirs.name} student and student.kind is "
                          f"{family.name}: set student.kind: {theirs.name}")
    pcfg = folder.pretrained_cfg()
    if pcfg is not None:  # its label names were those of its own data
        pcfg = {k: v for k, v in pcfg.items() if k not in ("label_names", "num_classes")}
    return folder.load_student(), pcfg

