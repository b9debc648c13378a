"""The recipe of a bootstrapping run: a typed schema, YAML loading and `a.b=value` overrides.

A recipe is a YAML file with the sections below (every key has a default except the
teacher and the training data, which a recipe must give — or the `demo:` section makes them)::

    teacher:  the teacher spec, passed as is to `teachers.create_teacher` (which validates it); a run that trains
              with labels alone, its student not built from a teacher, may have none
    student:  `kind` (the student family, default sparseformer), how it starts (`init`: teacher, scratch, a
              run folder or weights file; `students.init`) and that family's options
              (`students.family.StudentFamily.options`: tokens, focus_width, ... for SparseFormer)
    objective: what the student learns from: alignment with the teacher (default), labels (cross-entropy,
              label smoothing, Mixup/CutMix), distillation from the teacher's logits
    data:     train / val shards, batch size per process, loader, augmentation (RandAugment, random erasing)
    optim:    AdamW and its warm-up + cosine schedule (in steps or epochs; lr scaled with the batch), gradient
              clipping and accumulation, EMA of the weights, layer-wise lr decay
    loss:     cosine | smooth_l1 | mse (the alignment term), and label_weight (a CLIP student's zero-shot logits
              against the shards' labels)
    run:      output folder, seed, mixed precision, logging, checkpoints, held-out checks, resume
    eval:     the final report (zero-shot, linear probe, ...; keys of `eval.options.EvalConfig`)
    export:   the open_clip export at the end (CLIP teachers)
    demo:     optional: make the demo data and train the demo teacher first (`bootstrap.demo_teacher`)

`load_recipe(path, overrides)` reads the file, applies overrides such as
``optim.lr=3e-4`` or ``data.train=[a.tar,b.tar]`` (the value is parsed as YAML), and checks
every key and type: an unknown key or a wrong type is an error that names the key and, for
a misspelt one, the nearest valid key (`data.schema`, the loader of every config dataclass).
A loaded `Recipe` is frozen; `bootstrap.resolve` derives the run's resolved recipe from it, and
`Recipe.to_yaml()` of that one is saved with the run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from data.decode import DEFAULT_DECODE, DEFAULT_MAX_PIXELS, check_decode_path
from data.errors import UserError
from data.schema import load
from data.transforms import uses_timm_augment
from eval.options import EvalConfig
from data.media import ImageMedia, VideoMedia
from students import DEFAULT_FAMILY, ConfigError, family_named, family_of
from students.family import InitOptions
from students.init import check_init
from students.video import video_options, video_refusal


class RecipeError(UserError, ValueError):
    """A recipe (or an override) that does not describe a run."""


def _own_mapping(value: Any, where: str) -> dict:
    """A mapping section as the recipe's own deep copy (the teacher spec, data.augment): what the caller keeps
    cannot change the recipe."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"recipe key '{where}' must be a mapping, got {type(value).__name__} {value!r}")
    return copy.deepcopy(dict(value))


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class DataConfig:
    train: Union[str, list[str], None] = None  # training shards: folder, brace pattern, glob, or a list
    val: Union[str, list[str], None] = None  # held-out shards for the alignment check (none: no check)
    batch_size: int = 128  # per process; the global batch is batch_size x processes x optim.grad_accum
    num_workers: int = 4  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples shuffled in memory per worker
    resampled: bool = False  # draw shards with replacement (endless streams) instead of exact passes
    epoch_samples: Union[int, None] = None  # samples per epoch over all ranks (default: the dataset size)
    shardshuffle: bool = True  # shuffle the shard order every epoch
    augment: dict[str, Any] = field(default_factory=dict, metadata={"coerce": _own_mapping})
    # ^ scale, ratio, hflip, color_jitter (the replayable view, `teacher.train_transform`); auto_augment
    #   (timm's RandAugment, e.g. rand-m9-mstd0.5-inc1), re_prob, re_mode, re_count (random erasing): timm's
    #   create_transform then renders the views (`data.transforms.augmented_view`)
    # How training views decode JPEGs: fast (libjpeg-turbo, reduced where the crop allows, torch's uint8 resize)
    # | reduced (PIL, smaller in the DCT domain where the crop allows) | full (PIL, whole)
    decode: str = DEFAULT_DECODE
    # Cached teacher targets (bootstrap.target_source): a folder made by `python -m bootstrap.cache_targets`,
    # auto (made on first use, in the cache), or null: the teacher embeds every batch online.
    targets: Union[str, None] = None
    # Views per image that data.targets=auto caches (null: one per epoch of the run, so no view repeats). Fewer
    # views save the teacher's work (a teacher over 8 frames costs 8 images a clip) at the price of repeated views.
    target_views: Union[int, None] = None
    heldout_samples: int = 1000  # the first N images of `val` form the fixed held-out set
    eval_batch_size: int = 256
    # Images with more pixels are skipped and counted, from their header, before decoding (null: PIL's limits only).
    max_pixels: Union[int, None] = DEFAULT_MAX_PIXELS
    allow_pipe: bool = False  # let `pipe:CMD` shard URLs in train/val/eval data run CMD (printed first)
    # Video students (student.video): the decoder of video shards, auto (torchcodec where it works, else PyAV) | pyav
    # | torchcodec.
    video_backend: Literal["auto", "pyav", "torchcodec"] = "auto"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (for the global batch; no automatic scaling)
    min_lr: float = 1e-6  # end of the cosine
    weight_decay: float = 0.05  # on weight matrices only; RoIs, embeddings, norms and biases get none
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 500  # linear warm-up from 0 over this many optimizer steps
    steps: int = 10000  # optimizer steps in all
    grad_clip: Union[float, None] = 1.0  # max global gradient norm (null: no clipping)
    grad_accum: int = 1  # batches per optimizer step
    # warmup_cosine: linear warm-up from 0, then cosine to min_lr over the remaining steps. timm_cosine: timm's
    # CosineLRScheduler per step as the Swin codebase (SparseFormer v1) drives it: linear warm-up from
    # warmup_lr, cosine to min_lr over all steps (the warm-up included), step k at the schedule's value of k-1
    schedule: Literal["warmup_cosine", "timm_cosine"] = "warmup_cosine"
    warmup_lr: float = 0.0  # where timm_cosine's warm-up starts
    # lr, warmup_lr and min_lr are for this global batch and scale linearly with the run's (lr x batch / 512,
    # as the Swin codebase); null: as given
    lr_base_batch: Union[int, None] = None
    # The length in epochs of the training data (data.epoch_samples, else its size): the run sets steps and
    # warmup_steps from them (null: steps and warmup_steps as given)
    epochs: Union[float, None] = None
    warmup_epochs: Union[float, None] = None
    ema_decay: Union[float, None] = None  # EMA of the student's weights (timm ModelEmaV3), e.g. 0.9999; null: none
    # Layer-wise lr decay (timm's param_groups_layer_decay; fine-tuning): block i of L gets lr x decay^(L-i)
    layer_decay: Union[float, None] = None


@dataclass(frozen=True)
class LossConfig:
    type: Literal["cosine", "smooth_l1", "mse"] = "cosine"
    beta: float = 1.0  # smooth_l1 transition point
    normalize: bool = False  # smooth_l1 / mse on L2-normalised embeddings instead of raw ones
    # + label_weight x cross-entropy of the student's zero-shot logits with data.train's labels (`bootstrap.labels`:
    # labelled shards, a teacher with a text tower); 0: alignment only. This is the zero-shot-logit term for CLIP
    # students without a classifier head, while objective.labels trains the student's own head.
    label_weight: float = 0.0


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the student learns from: each term's weight (0: not in the loss), and how labels are used."""

    align: float = 1.0  # alignment of the student's output with the teacher's embedding (loss:)
    labels: float = 0.0  # cross-entropy with the training data's labels (.cls; dataset.json's classnames)
    label_smoothing: float = 0.1  # of the cross-entropy (and of the Mixup/CutMix targets)
    distill: float = 0.0  # KL to a supervised teacher's logits (DeiT's soft distillation, per image)
    temperature: float = 1.0  # of the distillation
    mixup: float = 0.0  # Mixup alpha (timm Mixup); 0: none
    cutmix: float = 0.0  # CutMix alpha; 0: none
    cutmix_minmax: Union[tuple[float, float], None] = None  # CutMix box ratio range (overrides the alpha)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    @property
    def needs_teacher(self) -> bool:
        return self.align > 0 or self.distill > 0


@dataclass(frozen=True)
class RunConfig:
    output_dir: Union[str, None] = None  # default: runs/<recipe file stem>
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 10  # metrics.jsonl / TensorBoard every N optimizer steps
    checkpoint_every: int = 1000  # and at the end
    keep_checkpoints: int = 3  # the last K complete checkpoints are kept
    eval_every: int = 1000  # held-out alignment check every N steps, at the start and at the end
    # auto (latest complete checkpoint, if any) | none | PATH of a checkpoint or run folder
    resume: Union[Literal["auto", "none"], str] = "auto"
    stop_after: Union[int, None] = None  # stop with a checkpoint after this step (time-limited jobs); resume later
    max_nonfinite: int = 20  # this many non-finite losses in a row stop the run (with a checkpoint)
    progress: bool = True  # tqdm bar on the main process
    log_sample_keys: bool = False  # write each rank's sample keys to sample_keys/rank-N.txt (debugging)
    final_report: bool = True  # eval.report.evaluate_run at the end (when the eval package is there)
    # Threads per process on a CPU. auto: the physical cores shared among the local processes,
    # unless OMP_NUM_THREADS says otherwise (but not the 1 that `accelerate launch` sets on a
    # machine without GPU when --cpu is not given, which would leave the other cores idle).
    cpu_threads: Union[int, Literal["auto"]] = "auto"


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True  # students.export.export_run at the end (CLIP teachers)


@dataclass(frozen=True)
class DemoTeacherConfig:
    """The demo's own small CLIP (see `bootstrap.demo_teacher`)."""

    width: int = 128  # image tower
    layers: int = 6
    heads: int = 4
    patch_size: int = 8
    embed_dim: int = 64
    text_width: int = 64  # the text tower stays locked at its random initialisation
    text_layers: int = 2
    text_heads: int = 2
    steps: int = 300  # the teacher trains by its steps alone: the cached teacher never depends on the clock
    seconds: Union[float, None] = None  # removed (a time cap): refused when set, with the reason
    min_zero_shot: float = 0.5  # a teacher below this zero-shot top-1 on the demo val split is neither cached nor used
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    caption_weight: float = 0.5  # + caption_weight x image-caption contrastive loss
    uniformity_weight: float = 1.0  # + uniformity_weight x uniformity of the image embeddings
    consistency_weight: float = 0.0  # + this x (1 - cosine) between two differently shifted views of an image
    consistency_images: Union[int, None] = None  # images of each batch that get the second view (null: all)
    seed: int = 0


@dataclass(frozen=True)
class DemoVideoConfig:
    """The video demo's own data: the demo's shapes, moving (`data.video_demo`), at `demo.image_size`."""

    num_videos: int = 600
    frames: int = 16  # per video
    val_fraction: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class DemoConfig:
    """Make the demo data and the demo teacher (cached), then fill `teacher:` and `data.train/val` (with `video`:
    the demo videos; the teacher is the image demo's, applied frame by frame)."""

    cache_dir: Union[str, None] = None  # default ~/.cache/sparseformer-bootstrap (or $SPARSEFORMER_CACHE)
    num_images: int = 2400
    image_size: int = 64
    val_fraction: float = 1 / 6
    data_seed: int = 0
    teacher: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    video: Union[DemoVideoConfig, None] = None


def student_options(value: Any, where: str = "student"):
    """The `student:` section: `kind` (default sparseformer) picks the family, whose options class
    (`students.family.StudentFamily.options`) checks the other keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"'{where}' must be a mapping of keys, got {type(value).__name__} {value!r}")
    mapping = dict(value)
    kind = mapping.pop("kind", DEFAULT_FAMILY)
    try:
        family = family_named(kind)
    except ValueError as exc:
        raise RecipeError(f"recipe key '{where}.kind': {exc}") from None
    if "video" in mapping and "video" not in {f.name for f in dataclasses.fields(family.options)}:
        raise RecipeError(video_refusal(family.name))
    return load(family.options, mapping, where, error=RecipeError, dotted=True)


@dataclass(frozen=True)
class Recipe:
    """A recipe, loaded and checked. Frozen: what the run derives from it (the demo's data and teacher, a random
    teacher's saved weights) makes a new recipe (`bootstrap.resolve`); nothing writes into one."""

    teacher: dict[str, Any] = field(default_factory=dict, metadata={"coerce": _own_mapping})
    # The student family's options (`kind: sparseformer` -> BootstrapOptions, `kind: sparsifiner` -> SparsifinerOptions).
    student: Any = field(default_factory=lambda: family_named(DEFAULT_FAMILY).options(),
                         metadata={"coerce": student_options})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    demo: Union[DemoConfig, None] = None
    name: Union[str, None] = None  # a name for the run (default: the recipe file stem)

    @property
    def family(self):
        """The student family (`students.family.StudentFamily`) of the `student:` section."""
        return family_of(self.student)

    @property
    def media(self):
        """What a sample is (`data.media`): a clip (`student.video`, decoded by `data.video_backend`) or an image."""
        video = video_options(self.student)
        if video is None:
            return ImageMedia()
        return VideoMedia(video.clip_sampling(), self.data.video_backend)

    @property
    def needs_teacher(self) -> bool:
        """Whether the run needs a teacher: an objective term that reads it, a student built from it, a video
        student (its targets are the teacher's frames) or loss.label_weight (the teacher's zero-shot classifier)."""
        return (self.objective.needs_teacher or getattr(self.student, "init", "teacher") == "teacher"
                or video_options(self.student) is not None or bool(self.loss.label_weight))

    def train_transform(self, teacher):
        """The training view of a sample: the teacher's augmentation (`data.augment`) of an image, or of every frame
        of a clip (one crop and flip per clip)."""
        d = self.data
        return self.media.train_transform(teacher.train_transform(decode=d.decode, **d.augment))

    def replace(self, **sections) -> "Recipe":
        """A new recipe with whole sections replaced (a mapping for `teacher` is frozen on the way in)."""
        if "teacher" in sections:
            sections["teacher"] = _own_mapping(sections["teacher"], "teacher")
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        d = _plain(self)
        d["student"] = {"kind": self.family.name, **d["student"]}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def validate(self) -> "Recipe":
        """Cross-key checks a type check cannot make."""
        o, r, d = self.optim, self.run, self.data
        positive = {"optim.steps": o.steps, "optim.grad_accum": o.grad_accum, "data.batch_size": d.batch_size,
                    "run.log_every": r.log_every, "run.checkpoint_every": r.checkpoint_every,
                    "run.eval_every": r.eval_every, "run.keep_checkpoints": r.keep_checkpoints,
                    "run.max_nonfinite": r.max_nonfinite, "data.eval_batch_size": d.eval_batch_size}
        if self.demo is not None:
            positive["demo.teacher.steps"] = self.demo.teacher.steps
        for key, value in positive.items():
            if value < 1:
                raise RecipeError(f"{key} must be at least 1, got {value}")
        if o.warmup_steps < 0 or o.warmup_steps > o.steps:
            raise RecipeError(f"optim.warmup_steps={o.warmup_steps} must be between 0 and optim.steps={o.steps}")
        for key in ("lr", "min_lr", "weight_decay", "eps", "grad_clip"):
            value = getattr(o, key)
            if value is not None and not math.isfinite(value):
                raise RecipeError(f"optim.{key} must be a finite number, got {value}")
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise RecipeError(f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0 (lr={o.lr}, min_lr={o.min_lr})")
        if o.weight_decay < 0:
            raise RecipeError(f"optim.weight_decay must be >= 0 (0: none), got {o.weight_decay}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in o.betas):
            raise RecipeError(f"optim.betas must be two numbers in [0, 1) (AdamW's, e.g. [0.9, 0.999]), got "
                              f"{list(o.betas)}")
        if not o.eps > 0:
            raise RecipeError(f"optim.eps must be above 0 (AdamW's, e.g. 1e-8), got {o.eps}")
        if r.cpu_threads != "auto" and r.cpu_threads < 1:
            raise RecipeError(f"run.cpu_threads must be 'auto' or at least 1, got {r.cpu_threads}")
        if d.num_workers < 0:
            raise RecipeError(f"data.num_workers must be >= 0, got {d.num_workers}")
        if d.shuffle_buffer < 0:
            raise RecipeError(f"data.shuffle_buffer must be >= 0 (0 or 1: no shuffling), got {d.shuffle_buffer}")
        if d.heldout_samples < 2:
            # One image would retrieve itself among one: "retrieval 1.000, chance 1.000" says nothing.
            raise RecipeError(f"data.heldout_samples must be at least 2 (retrieval needs several images), "
                              f"got {d.heldout_samples}; set data.val=null for no held-out check")
        if d.max_pixels is not None and d.max_pixels < 1:
            raise RecipeError(f"data.max_pixels must be at least 1 or null (no limit of ours), got {d.max_pixels}")
        if d.epoch_samples is not None and d.epoch_samples < 1:
            raise RecipeError(f"data.epoch_samples must be at least 1 or null (the dataset size), got {d.epoch_samples}")
        if r.stop_after is not None and r.stop_after < 1:
            raise RecipeError(f"run.stop_after must be at least 1 or null (run to optim.steps), got {r.stop_after}")
        if o.grad_clip is not None and not o.grad_clip > 0:
            # A negative max norm flips every gradient (the student would train away from the teacher).
            raise RecipeError(f"optim.grad_clip must be above 0 or null (no clipping), got {o.grad_clip}")
        check_augment(d.augment)
        try:
            check_decode_path(d.decode)
        except ValueError as exc:
            raise RecipeError(f"data.decode={exc}") from None
        if not (math.isfinite(self.loss.label_weight) and self.loss.label_weight >= 0):
            raise RecipeError(f"loss.label_weight must be a finite number >= 0 (0: no supervised term), got "
                              f"{self.loss.label_weight}")
        if d.target_views is not None and d.target_views < 1:
            raise RecipeError(f"data.target_views must be at least 1 or null (one per epoch), got {d.target_views}")
        if d.targets is not None and not d.targets.strip():
            raise RecipeError("data.targets must be a targets folder (python -m bootstrap.cache_targets), auto, or null")
        self._validate_objective()
        if self.demo is not None:
            teacher = self.demo.teacher
            if teacher.seconds is not None:
                raise RecipeError("demo.teacher.seconds is no longer a key: the demo teacher trains by its steps "
                                  "(demo.teacher.steps), so that a busy machine caches the same teacher as a quiet one; "
                                  "remove the key")
            if not 0 <= teacher.min_zero_shot < 1:
                raise RecipeError(f"demo.teacher.min_zero_shot must be a fraction in [0, 1) (the quality floor of the "
                                  f"demo teacher's zero-shot top-1; chance is 0.1), got {teacher.min_zero_shot}")
            if teacher.consistency_images is not None and teacher.consistency_images < 1:
                raise RecipeError(f"demo.teacher.consistency_images must be at least 1 or null (all), "
                                  f"got {teacher.consistency_images}")
            video = self.demo.video
            if video is not None:
                if video.frames < 2 or video.num_videos < 4 or not 0 < video.val_fraction < 1:
                    raise RecipeError(f"demo.video needs frames >= 2, num_videos >= 4 and 0 < val_fraction < 1, got "
                                      f"frames={video.frames}, num_videos={video.num_videos}, "
                                      f"val_fraction={video.val_fraction}")
                if video_options(self.student) is None:
                    raise RecipeError("demo.video makes demo videos, but the student takes images: add student.video "
                                      "(e.g. student.video={frames: 8}) or drop demo.video")
        else:
            if not self.teacher and self.needs_teacher:
                raise RecipeError("the recipe has no teacher: give a 'teacher:' spec (kind, model, pretrained, ...) "
                                  "or a 'demo:' section" + (
                                      "" if not self.objective.labels else "; a run with labels alone "
                                      "(objective.align=0, objective.distill=0) needs none if its student starts "
                                      "otherwise (student.init: scratch with student.config, a run folder, ...)"))
            if d.train is None:
                raise RecipeError("the recipe has no training data: set data.train to the training shards "
                                  "(e.g. data.train=/data/imagenet/train) or add a 'demo:' section")
        return self


    def _validate_objective(self) -> None:
        """The objective, the schedule keys that go with it, and how the student starts."""
        o, b, d = self.objective, self.optim, self.data
        for key in ("align", "labels", "distill", "label_smoothing", "mixup", "cutmix"):
            value = getattr(o, key)
            if not (math.isfinite(value) and value >= 0):
                raise RecipeError(f"objective.{key} must be a number >= 0, got {value}")
        if not (o.align or o.labels or o.distill):
            raise RecipeError("the objective has no term: set objective.align (the teacher's embedding), "
                              "objective.labels or objective.distill above 0")
        if o.label_smoothing >= 1:
            raise RecipeError(f"objective.label_smoothing must be below 1 (e.g. 0.1), got {o.label_smoothing}")
        if not o.temperature > 0:
            raise RecipeError(f"objective.temperature must be above 0, got {o.temperature}")
        for key in ("mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(o, key) <= 1:
                raise RecipeError(f"objective.{key} is a probability in [0, 1], got {getattr(o, key)}")
        if o.cutmix_minmax is not None and not 0 < o.cutmix_minmax[0] <= o.cutmix_minmax[1] <= 1:
            raise RecipeError(f"objective.cutmix_minmax must be [min, max] with 0 < min <= max <= 1, got "
                              f"{list(o.cutmix_minmax)}")
        if o.mixes and not o.labels:
            raise RecipeError("Mixup/CutMix (objective.mixup, cutmix) mix the labels too: they need objective.labels "
                              "above 0")
        if o.mixes and self.loss.label_weight:
            raise RecipeError("Mixup/CutMix mix the labels, and loss.label_weight's zero-shot term takes one class a "
                              "sample: set loss.label_weight=0 (objective.labels trains the head on the mixed labels) "
                              "or objective.mixup=0 and objective.cutmix=0")
        if o.mixes and d.batch_size % 2:
            raise RecipeError(f"Mixup/CutMix mix each image with another of its batch (timm's Mixup, which flips the "
                              f"batch): data.batch_size must be even, got {d.batch_size}; or set objective.mixup=0 "
                              f"and objective.cutmix=0")
        if d.targets is not None and (o.mixes or uses_timm_augment(d.augment)):
            raise RecipeError("cached targets (data.targets) hold the teacher's embeddings of replayable views: they "
                              "cannot follow Mixup/CutMix or RandAugment/random erasing (data.augment.auto_augment, "
                              "re_prob); set data.targets=null (the teacher embeds each batch online)")
        if b.ema_decay is not None and not 0 < b.ema_decay < 1:
            raise RecipeError(f"optim.ema_decay must be between 0 and 1 (e.g. 0.9999), got {b.ema_decay}; null: no EMA")
        if b.layer_decay is not None and not 0 < b.layer_decay <= 1:
            raise RecipeError(f"optim.layer_decay must be in (0, 1] (e.g. 0.65), got {b.layer_decay}; null: none")
        if b.lr_base_batch is not None and b.lr_base_batch < 1:
            raise RecipeError(f"optim.lr_base_batch must be at least 1 (e.g. 512) or null, got {b.lr_base_batch}")
        if not (math.isfinite(b.warmup_lr) and 0 <= b.warmup_lr <= b.lr):
            raise RecipeError(f"optim.warmup_lr must be between 0 and optim.lr={b.lr}, got {b.warmup_lr}")
        if b.warmup_lr and b.schedule != "timm_cosine":
            raise RecipeError("optim.warmup_lr is where optim.schedule=timm_cosine's warm-up starts; "
                              "warmup_cosine warms up from 0: set optim.schedule=timm_cosine or leave warmup_lr out")
        if b.epochs is not None and not b.epochs > 0:
            raise RecipeError(f"optim.epochs must be above 0 or null (optim.steps), got {b.epochs}")
        if b.warmup_epochs is not None and (b.epochs is None or not 0 <= b.warmup_epochs <= b.epochs):
            raise RecipeError(f"optim.warmup_epochs={b.warmup_epochs} needs optim.epochs and must be between 0 and "
                              f"it (optim.epochs={b.epochs})")
        if not self.teacher and self.demo is None and video_options(self.student) is not None:
            raise RecipeError("the recipe has no teacher, but a video student (student.video) learns from its "
                              "teacher's frames: give a 'teacher:' spec or a 'demo:' section")
        if not self.teacher and self.demo is None and self.loss.label_weight:
            raise RecipeError(f"loss.label_weight={self.loss.label_weight} learns the labels through the "
                              f"teacher's zero-shot classifier, and the recipe has no teacher: give a 'teacher:' "
                              f"spec, or set loss.label_weight=0 and use objective.labels (the student's head)")
        video, init = video_options(self.student), getattr(self.student, "init", "teacher")
        if video is not None and init != "teacher":
            raise RecipeError(f"student.init={init}: a video student is its teacher's image student inflated to clips "
                              f"(student.init: teacher); to start from a trained image student give its run folder "
                              f"as student.video.image_student")
        if isinstance(self.student, InitOptions):
            try:
                check_init(self.family, self.student, bool(self.teacher) or self.demo is not None)
            except ConfigError as exc:
                raise RecipeError(str(exc)) from None


def check_augment(augment: Mapping[str, Any]) -> None:
    """`data.augment`: the keys `Teacher.train_transform` takes, with values it can use."""
    from teachers.base import _AUG_KEYS, closest

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def pair(key: str, low: float, high: float | None) -> None:
        v = augment[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(number(x) for x in v)
                and low < v[0] <= v[1] and (high is None or v[1] <= high)):
            bound = f"0 < min <= max <= {high}" if high is not None else "0 < min <= max"
            raise RecipeError(f"data.augment.{key} must be [min, max] with {bound}, got {v!r}")

    for key in augment:
        if key not in _AUG_KEYS:
            raise RecipeError(f"unknown recipe key 'data.augment.{key}'.{closest(str(key), _AUG_KEYS)} "
                              f"Valid keys of data.augment: {', '.join(_AUG_KEYS)}")
    policy = augment.get("auto_augment")
    if policy is not None and not (isinstance(policy, str) and policy.startswith(("rand", "augmix", "original",
                                                                                   "v0", "3a"))):
        raise RecipeError(f"data.augment.auto_augment must be a timm auto-augment policy such as "
                          f"rand-m9-mstd0.5-inc1 (or null), got {policy!r}")
    re_prob = augment.get("re_prob", 0.0)
    if not (number(re_prob) and 0 <= re_prob <= 1):
        raise RecipeError(f"data.augment.re_prob (random erasing) is a probability in [0, 1], got {re_prob!r}")
    if augment.get("re_mode", "pixel") not in ("const", "rand", "pixel"):
        raise RecipeError(f"data.augment.re_mode must be const, rand or pixel (timm's RandomErasing), got "
                          f"{augment['re_mode']!r}")
    count = augment.get("re_count", 1)
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise RecipeError(f"data.augment.re_count must be an integer >= 1, got {count!r}")
    if "scale" in augment:
        pair("scale", 0.0, 1.0)
    if "ratio" in augment:
        pair("ratio", 0.0, None)
    flip = augment.get("hflip", 0.0)
    if not (isinstance(flip, bool) or (number(flip) and 0 <= flip <= 1)):
        raise RecipeError(f"data.augment.hflip must be a probability between 0 and 1, got {flip!r}")
    jitter = augment.get("color_jitter")
    values = jitter if isinstance(jitter, (list, tuple)) else [] if jitter is None else [jitter]
    if (isinstance(jitter, (list, tuple)) and len(jitter) not in (3, 4)) or not all(number(v) and v >= 0 for v in values):
        raise RecipeError(f"data.augment.color_jitter must be null, a number >= 0 or [brightness, contrast, "
                          f"saturation(, hue)] of numbers >= 0, got {jitter!r}")


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = (), base: Mapping | None = None) -> Recipe:
    """Read a recipe file (or start from `base`), apply `a.b=value` overrides, type-check, validate."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist (recipes live in recipes/, e.g. recipes/demo.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{path} must hold a mapping of sections (teacher:, student:, data:, ...)")
        data.update(loaded or {})
    for item in overrides:
        apply_override(data, item)
    recipe = load(Recipe, data, "", error=RecipeError, dotted=True)
    if recipe.name is None and path is not None:
        recipe = dataclasses.replace(recipe, name=path.stem)
    if recipe.run.output_dir is None:
        recipe = recipe.replace(run=dataclasses.replace(recipe.run, output_dir=str(Path("runs") / (recipe.name or "run"))))
    return recipe.validate()


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw recipe mapping (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _plain(obj):
    """Dataclasses and mappings to dicts, tuples to lists, recursively (YAML- and JSON-friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
