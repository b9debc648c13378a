"""The evaluation bench: a teacher and the models to hold against it (students, training-free baselines), on the
same images, in one pass, in one process.

`run_bench(teacher, candidates, config)` extracts every model's features once and runs each section for every
model, teacher against model:

    zero-shot       where the teacher has a text tower (a CLIP: its classifier, logit scale and bias)
    classification  where the teacher has a classifier whose classes are the evaluation set's, and for the
                    models whose own head predicts them (students trained with labels: `eval.classify`)
    fidelity        where there is a teacher: the model's embedding against the teacher's, image by image
    linear probe    `eval.probe` (one logistic regression per model on the same split)
    cost            parameters, counted GFLOPs, img/s, peak memory
    pictures and    what a student's family adds (`students.family.StudentFamily.pictures` and
    family sections   `.sections`: RoIs, kept keys, attention cost)

`python -m eval` is the bench with one student (`eval.report`), `python -m eval.compare` with many and ToMe
(`eval.compare`); both render the same `BenchResult`. The teacher may be None (a student trained with labels
alone): the sections that hold a model against it are left out, the others measure each model on its own, with
the first student's preprocessing. A candidate that is the EMA of another's weights (``shadow``) has that one's
cost and pictures, which are measured once.

Images or videos (`bench_media`): video students are evaluated on video shards, as video models are: each
video gives ``clips x crops`` views (`EvalConfig.clips`, ``crops``; clips of the frames the student was trained
on), every model embeds every view (the teacher frame by frame: the mean of its frame embeddings,
`teachers.frames`), and a video's embedding is the mean of its views'. The sections are the same, with
class names and templates from the shards' ``dataset.json`` (or ``kinetics400`` / ``kinetics``), plus
text <-> video retrieval (`eval.retrieval`) where the videos have captions and the teacher a text tower;
cost is per view (a clip) and per video (views x GFLOPs per view, as video papers report it). Video students
always have a teacher.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from data.media import ImageMedia, VideoMedia
from students import family_of
from students.video import student_clip
from teachers.frames import media_teacher

from .classify import classification_eval, head_applies, own_head_applies
from .cost import compare_cost
from .features import aligned_output, extract, student_outputs, teacher_classifier
from .fidelity import fidelity
from .linear_probe import DEFAULT_CS, linear_probe, split_features, train_labels_of
from .options import PRECISIONS, EvalConfig
from .retrieval import encode_captions, retrieval_eval
from .zeroshot import dataset_templates, resolve_classnames, resolve_templates, template_set_name, zero_shot_classifier
from .zeroshot import zero_shot_eval

__all__ = ["TEACHER", "BenchResult", "Candidate", "bench_media", "has_text_tower", "jsonable", "run_bench",
           "student_candidate"]

TEACHER = "teacher"


@dataclass
class Candidate:
    """A model held against the teacher: its name, its kind ('student', 'tome', ...), the module (its
    ``forward_outputs`` gives ``(pre_logits, output)``), the module whose parameters its cost counts, and what
    the report says of it."""

    name: str
    kind: str
    model: nn.Module
    params: nn.Module
    info: dict = field(default_factory=dict)
    family: Any = None  # a student's family (`students.family.StudentFamily`), for its pictures and sections
    classes: list[str] | None = None  # the classes its own head predicts (a student trained with labels)
    shadow: str | None = None  # the candidate whose weights this one averages (an EMA): same cost and pictures


def image_tower(teacher) -> nn.Module:
    """The teacher's parameters an image passes through (open_clip: ``model.visual``)."""
    return getattr(teacher.model, "visual", teacher.model)


def describe_teacher(teacher) -> dict | None:
    if teacher is None:
        return None
    return dict(kind=teacher.kind, name=teacher.name, family=teacher.family, target=teacher.target,
                embed_dim=teacher.embed_dim, depth=teacher.depth, width=teacher.width,
                num_patches=teacher.num_patches, image_size=list(teacher.preprocess.size),
                spec=jsonable(dict(teacher.spec)))


def student_candidate(name: str, student: nn.Module, source: str | None = None, shadow: str | None = None) -> Candidate:
    """A student of any family, described by its family (`students.family.StudentFamily.describe`); the classes of
    its head where it was trained with labels (its pretrained_cfg's ``label_names``); ``shadow``: the candidate
    whose EMA it is."""
    try:
        family = family_of(student)
    except TypeError:  # e.g. a teacher standing in for a perfect student
        family = None
    info = dict(type=type(student).__name__, family=family.name if family else None)
    cfg = getattr(student, "config", None)
    if family is not None:
        info.update(family.describe(student), embed_dim=cfg.embed_dim, output_dim=cfg.output_dim,
                    model_type=getattr(cfg, "model_type", None))
    if source is not None:
        info["source"] = source
    classes = (getattr(student, "pretrained_cfg", None) or {}).get("label_names")
    if shadow is not None:
        info["ema_of"] = shadow
    return Candidate(name, "student", student, student, info, family, None if classes is None else list(classes),
                     shadow)


def has_text_tower(teacher) -> bool:
    """Whether the teacher can name classes (a CLIP text tower): zero-shot applies."""
    return getattr(teacher, "tokenizer", None) is not None


def jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


@dataclass
class BenchResult:
    """Every section, teacher against each model (``name -> result``); `probe` and `cost` hold every model."""

    teacher: dict
    device: str
    config: dict
    notes: list[str] = field(default_factory=list)
    eval_set: dict | None = None
    zero_shot: dict[str, dict] = field(default_factory=dict)
    classification: dict[str, dict] = field(default_factory=dict)
    fidelity: dict[str, dict] = field(default_factory=dict)
    probe: dict | None = None
    retrieval: dict[str, dict] = field(default_factory=dict)  # name -> text <-> video recall (captioned videos)
    cost: dict | None = None
    media: dict = field(default_factory=lambda: {"kind": "image"})  # `data.media` settings (video: clips, views)
    pictures: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {report key: file}
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {family section key: result}


def _skips(loader) -> dict:
    """``num_skipped`` and ``skipped`` (name and error of each sample that did not decode)."""
    skipped = loader.skipped_report() if hasattr(loader, "skipped_report") else []
    return dict(num_skipped=len(skipped), skipped=skipped)


def bench_media(candidates: Sequence[Candidate], cfg: EvalConfig):
    """What the bench evaluates on (`data.media`): videos when the students are video students (clips of the
    frames the first was trained on, ``cfg.clips`` x ``cfg.crops`` views per video), else images."""
    clips = {c.name: student_clip(c.model) for c in candidates if c.kind == "student"}
    video = [name for name, clip in clips.items() if clip is not None]
    if not video:
        return ImageMedia()
    if len(video) != len(clips):
        image = [name for name in clips if name not in video]
        raise ValueError(f"{', '.join(video)} take(s) clips and {', '.join(image)} images: evaluate video and image "
                         f"students apart")
    return VideoMedia(clips[video[0]], cfg.video_backend, cfg.clips, cfg.crops)


def probe_train_split(cfg: EvalConfig, transform, dataset_classnames, allow_pipe: bool = False, media=None):
    """The probe's train split, ``(loader, classnames, train label of each eval class)``, or None (no
    `train_data`, or no probe). The two sets' labels are matched by class name (refused where a class is missing)."""
    if not cfg.probe or cfg.train_data is None:
        return None
    loader, train_classnames = (media or ImageMedia()).eval_loader(cfg.train_data, transform, cfg.batch_size,
                                                                   cfg.num_workers, allow_pipe, cfg.max_pixels)
    if train_classnames is None:
        raise ValueError(f"the linear probe's train split {jsonable(cfg.train_data)} has no class names (its "
                         f"dataset.json lists none)")
    return loader, train_classnames, train_labels_of(dataset_classnames, train_classnames, jsonable(cfg.data),
                                                     jsonable(cfg.train_data))


def _over_views(step: Callable[[Tensor], dict]) -> Callable[[Tensor], dict]:
    """A step over videos ``[B, V, T, 3, H, W]``: every model on the ``B * V`` views, then the mean over each
    video's V views."""

    def over_views(videos: Tensor) -> dict:
        b, v = videos.shape[:2]
        out = step(videos.flatten(0, 1))
        return {k: x.reshape(b, v, *x.shape[1:]).float().mean(dim=1) for k, x in out.items()}

    return over_views


def _step(teacher, candidates: Sequence[Candidate], teacher_logits: bool = False,
          logits: Sequence[str] = (), media=None) -> Callable[[Tensor], dict]:
    """``images -> {teacher, NAME, ...}``: every model's output aligned to ``teacher.embed`` (without a teacher its
    pre-logits feature), with ``teacher_logits`` the teacher's head outputs, and ``NAME:logits``, the head outputs
    of the models named in ``logits``, from one batch; of videos (``media``), the mean over each video's views."""
    head = teacher_classifier(teacher) if teacher_logits else None

    def step(images):
        out = {}
        if teacher is not None:
            t = out[TEACHER] = teacher.embed(images)
            if teacher_logits:
                out[f"{TEACHER}:logits"] = head(t)
        for c in candidates:
            pre, o = student_outputs(c.model, images)
            out[c.name] = pre if teacher is None else aligned_output(teacher.target, pre, o)
            if c.name in logits:
                out[f"{c.name}:logits"] = o
        return out

    return _over_views(step) if getattr(media, "video", False) else step


def preprocess_of(teacher, candidates: Sequence[Candidate]) -> dict:
    """The input size, mean, std, interpolation and crop of the evaluation: the teacher's, or without one the
    first student's (its pretrained_cfg)."""
    if teacher is not None:
        p = teacher.preprocess
        return dict(size=tuple(p.size), mean=tuple(p.mean), std=tuple(p.std))
    for c in candidates:
        pcfg = getattr(c.model, "pretrained_cfg", None)
        if pcfg:
            return dict(size=tuple(pcfg["input_size"][1:]), mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"]),
                        interpolation=pcfg.get("interpolation", "bicubic"), crop_pct=pcfg.get("crop_pct", 0.875))
    raise ValueError("without a teacher, the evaluation takes a student's preprocessing (its pretrained_cfg: "
                     "input_size, mean, std); none of the models has one")


def _eval_view(teacher, candidates: Sequence[Candidate]):
    if teacher is not None:
        return teacher.eval_transform()
    from data.transforms import eval_transform

    p = preprocess_of(None, candidates)
    return eval_transform(p["size"], p["mean"], p["std"], p["interpolation"], p["crop_pct"])


def _pair(features, name: str) -> dict:
    """The teacher's and one model's features under the names the teacher-vs-student functions take."""
    pair = {"teacher": features.get(TEACHER), "student": features[name]}
    if "labels" in features:
        pair["labels"] = features["labels"]
    if f"{name}:logits" in features:
        pair["student_logits"] = features[f"{name}:logits"]
        if f"{TEACHER}:logits" in features:
            pair["teacher_logits"] = features[f"{TEACHER}:logits"]
    return pair


def _probe(cfg: EvalConfig, test_features, probe_train, step, device, autocast_dtype, progress,
           models: Sequence[str]) -> dict:
    """Linear probe of each of ``models`` (keys of ``step``'s output) on the train split or half the eval set;
    ``probe_train`` is ``(loader, classnames, train label of each eval class)`` or None."""
    probe_args = dict(Cs=cfg.probe_cs or DEFAULT_CS, val_fraction=cfg.probe_val_fraction, seed=cfg.seed)
    test = {k: test_features[k] for k in (*models, "labels")}
    extra = {}
    if probe_train is not None:
        loader, train_classnames, train_label = probe_train
        train = extract(loader, step, device, cfg.train_max_samples, autocast_dtype, desc="probe train features",
                        progress=progress)
        test["labels"] = train_label[test["labels"]]  # the evaluation set's labels in the train split's terms
        split = f"train: {jsonable(cfg.train_data)}"
        if len(train_label) != len(train_classnames) or not torch.equal(train_label, torch.arange(len(train_label))):
            split += (f"; labels matched by class name ({len(train_label)} of the train split's "
                      f"{len(train_classnames)} classes in the evaluation set)")
        extra = {f"train_{k}": v for k, v in _skips(loader).items()}
    else:
        train, test = split_features(test, cfg.probe_test_fraction, cfg.seed)
        split = f"the evaluation set split {1 - cfg.probe_test_fraction:.0%} train / {cfg.probe_test_fraction:.0%} test"
    result = linear_probe(train, test, models=models, **probe_args)
    result["split"] = split
    result.update(extra)
    return result


def _first_images(loader, n: int) -> Tensor:
    images = []
    for batch in loader:
        images.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n]


def _aligned_fn(model: nn.Module, target: str | None):
    def fn(images):
        pre, out = student_outputs(model, images)
        return pre if target is None else aligned_output(target, pre, out)

    return fn


def run_bench(teacher, candidates: Sequence[Candidate], cfg: EvalConfig, *, pictures_dir: str | os.PathLike | None = None,
              progress: bool = True, notes: Sequence[str] = (), allow_pipe: bool = False) -> BenchResult:
    """Hold every candidate against ``teacher`` on ``cfg.data`` (see the module docstring). With ``pictures_dir``,
    the students' pictures are drawn there (`cfg.rois`). ``allow_pipe`` lets ``pipe:`` shard URLs run their
    commands."""
    names = [c.name for c in candidates]
    if TEACHER in names or len(set(names)) != len(names):
        raise ValueError(f"the models need distinct names other than '{TEACHER}', got {names}")
    media = bench_media(candidates, cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast_dtype = PRECISIONS[cfg.precision]
    result = BenchResult(describe_teacher(teacher), str(device), jsonable(cfg.to_dict()), list(notes))
    result.media = jsonable(media.settings())
    training = {c.name: c.model.training for c in candidates}
    if teacher is None and media.video:
        raise ValueError("video students are evaluated against their teacher (frame by frame): give the teacher")
    answering = None if teacher is None else media_teacher(teacher, media)  # over clips: frame by frame
    if answering is not None:
        answering.to(device)
    for c in candidates:
        c.model.eval().to(device)
    try:
        if cfg.data is not None:
            _sections(answering, candidates, cfg, result, device, autocast_dtype, progress, pictures_dir, allow_pipe,
                      media)
        else:
            result.notes.append("no evaluation set (eval.data / --data): accuracy, fidelity and pictures skipped, "
                                "cost only")
        if cfg.cost:
            fns = {} if teacher is None else {TEACHER: (answering.embed, image_tower(teacher))}
            target = None if teacher is None else teacher.target
            fns.update({c.name: (_aligned_fn(c.model, target), c.params) for c in candidates if c.shadow is None})
            result.cost = compare_cost(fns, preprocess_of(teacher, candidates)["size"], batch_size=cfg.cost_batch_size,
                                       device=device, iters=cfg.cost_iters, warmup=min(3, cfg.cost_iters),
                                       autocast_dtype=autocast_dtype, frames=media.frames if media.video else None)
            if media.video:  # a video is views x clips: its cost is the views' (the way video papers count)
                for cost in result.cost.values():
                    cost.update(views=media.num_clips * media.num_crops,
                                gflops_per_video=cost["gflops"] * media.num_clips * media.num_crops)
    finally:
        for c in candidates:
            c.model.train(training[c.name])
    return result


def _labelled(features, names: Sequence[str] | None) -> str | None:
    """Why accuracy cannot be measured on these features (no class names, samples without a label), or None."""
    if names is None:
        return "the evaluation set names no classes (its dataset.json lists no classnames; give eval.classnames)"
    if "labels" not in features or bool((features["labels"] < 0).any()):
        return "some of its samples have no label (no .cls)"
    return None


def _sections(teacher, candidates, cfg, result, device, autocast_dtype, progress, pictures_dir, allow_pipe,
              media) -> None:
    transform = _eval_view(teacher, candidates) if teacher is None else \
        media.eval_transform(teacher.preprocess, teacher.eval_transform())
    loader, dataset_classnames = media.eval_loader(cfg.data, transform, cfg.batch_size, cfg.num_workers,
                                                   allow_pipe=allow_pipe, max_pixels=cfg.max_pixels)
    # Class names are checked before any feature is computed: the prompts' and the probe's.
    named = dataset_classnames is not None or cfg.classnames is not None or not media.video
    zero_shot_names = resolve_classnames(cfg.classnames, dataset_classnames) \
        if teacher is not None and has_text_tower(teacher) and named else None
    probe_train = probe_train_split(cfg, transform, dataset_classnames, allow_pipe, media)
    teacher_logits = teacher is not None and teacher_classifier(teacher) is not None and dataset_classnames is not None
    if teacher_logits:
        why = head_applies(teacher, len(dataset_classnames))
        if why:
            result.notes.append(f"classification skipped: {why}")
            teacher_logits = False
    logits = []
    for c in candidates:
        if teacher_logits and c.classes is None:  # a head inherited from the teacher (or ToMe's, the teacher's)
            logits.append(c.name)
            continue
        if dataset_classnames is None:
            continue
        why = own_head_applies(c.classes, c.info.get("output_dim", 0), dataset_classnames, teacher is not None) \
            if c.kind == "student" else "no head of its own"
        if why is None:
            logits.append(c.name)
        elif c.classes is not None:
            result.notes.append(f"classification of {c.name} skipped: {why}")
    features = extract(loader, _step(teacher, candidates, teacher_logits, logits, media), device, cfg.max_samples,
                       autocast_dtype, desc=f"eval features ({media.unit}s)" if media.video else "eval features",
                       progress=progress)
    num_images = int(features[TEACHER if teacher is not None else candidates[0].name].shape[0])
    result.eval_set = dict(source=jsonable(cfg.data), num_images=num_images,
                           num_classes=len(dataset_classnames) if dataset_classnames else 0,
                           classnames=list(dataset_classnames or []), **_skips(loader))
    if media.video:
        result.eval_set.update(media="video", views_per_video=media.num_clips * media.num_crops,
                               clip=media.sampling.describe())
    names = [c.name for c in candidates]
    unlabelled = _labelled(features, dataset_classnames if not media.video else (zero_shot_names or
                                                                                 dataset_classnames))
    if unlabelled and (zero_shot_names is not None or logits or cfg.probe):
        result.notes.append(f"zero-shot, classification and the linear probe skipped: {unlabelled}")
        zero_shot_names, logits, probe = None, [], False
    else:
        probe = cfg.probe
    if zero_shot_names is not None:
        # None: the evaluation set's own templates if its dataset.json lists some, else openai.
        templates = cfg.templates if cfg.templates is not None else dataset_templates(cfg.data)
        classifier = zero_shot_classifier(teacher, zero_shot_names, templates, device)
        bias = getattr(teacher, "logit_bias", None)
        scale = teacher.logit_scale if bias is not None else 100.0
        for name in names:
            zs = zero_shot_eval(_pair(features, name), classifier, scale, bias)
            zs["templates"] = "the evaluation set's" if templates is not cfg.templates else template_set_name(templates)
            zs["num_templates"] = len(resolve_templates(templates))
            result.zero_shot[name] = zs
    result.classification = {name: classification_eval(_pair(features, name)) for name in logits}
    if teacher is not None:
        result.fidelity = {name: fidelity(features[name], features[TEACHER]) for name in [TEACHER, *names]}
    if probe:
        result.probe = _probe(cfg, features, probe_train, _step(teacher, candidates, media=media), device,
                              autocast_dtype, progress, models=([TEACHER] if teacher is not None else []) + names)
    captions = getattr(loader, "captions", None)
    if teacher is not None and captions and has_text_tower(teacher) and all(captions[:num_images]):
        text = encode_captions(teacher, captions[:num_images], device)
        result.retrieval = {name: retrieval_eval(features[name], text) for name in [TEACHER, *names]}
    elif media.video and has_text_tower(teacher):
        result.notes.append("text <-> video retrieval skipped: not every video has a caption")
    students = [c for c in candidates if c.family is not None and c.shadow is None]
    if media.video:
        if cfg.rois and any(c.family.pictures or c.family.sections for c in students):
            result.notes.append("the students' pictures and family sections are drawn for image students only")
        return
    if cfg.rois and pictures_dir is not None and any(c.family.pictures for c in students):
        images = _first_images(loader, cfg.roi_images).to(device)
        p = preprocess_of(teacher, candidates)
        for c in students:
            for picture in c.family.pictures:
                file = picture.file if len(students) == 1 else f"{c.name}-{picture.file}"
                picture.draw(c.model, images, Path(pictures_dir) / file, p["mean"], p["std"])
                result.pictures.setdefault(c.name, {})[picture.key] = file
    if cfg.cost and any(c.family.sections for c in students):
        images = _first_images(loader, cfg.cost_batch_size).to(device)
        for c in students:
            for section in c.family.sections:
                result.sections.setdefault(c.name, {})[section.key] = section.measure(c.model, images)
