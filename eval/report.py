"""One evaluation report per student checkpoint, teacher and student side by side.

``evaluate(student, teacher, eval_source, out_dir=...)`` runs what applies to the teacher's
family, on the same images for both models:

    clip:        zero-shot, linear probe, fidelity, cost, RoI pictures
    supervised:  classification through the head, linear probe, fidelity, cost, RoI pictures
    dino:        linear probe, fidelity, cost, RoI pictures

and writes ``report.json``, ``report.md`` (tables with teacher, student and student/teacher
columns) and ``rois.png`` into ``out_dir``. Without an evaluation set only the cost is
measured. A section that cannot run says why under ``notes``. Images that do not decode are
skipped, counted and named (``eval_set.skipped``, ``linear_probe.train_skipped``, and in
``report.md``). With a separate train split the probe matches the two sets' labels by class
name: the evaluation set may hold some of its classes, and one it lacks is an error, given
before any feature is computed.

``evaluate_run(run_dir)`` evaluates a bootstrapping run's output folder: ``student_config.json``
+ ``student.safetensors`` (the student), ``recipe.yaml`` (its ``teacher:`` mapping is the
teacher spec, which must name the teacher's weights: a random teacher cannot be rebuilt) and
the recipe's ``eval:`` mapping, whose keys are the fields of ``EvalConfig``:

    eval:
      data: PATH              # labelled evaluation set: ImageFolder root or labelled shards
                              # (folder with .tar + dataset.json, pattern, or list); none: cost only
      train_data: PATH        # labelled train split for the linear probe
                              # (none: the eval set is split in two, seeded and stratified)
      classnames: null        # zero-shot class names: null (the eval set's; ImageNet-1k's for
                              # an ImageNet folder of WordNet ids or no eval set), imagenet, or a list
      templates: null         # zero-shot prompts: openai (80) | simple (7) | demo | list of "{}" strings;
                              # null: the eval set's own (its dataset.json's, e.g. the demo's), else openai
      batch_size: 64
      num_workers: 2
      max_samples: null       # cap on evaluation images (null: all)
      train_max_samples: null # cap on linear-probe training images
      max_pixels: 64000000    # larger images are skipped and counted before decoding (null: no limit of ours)
      probe: true             # linear probe
      probe_cs: null          # C grid (null: 1e-2 ... 1e4)
      probe_val_fraction: 0.2 # held-out part of the train split that chooses C
      probe_test_fraction: 0.5 # part of the eval set used for testing when there is no train_data
      seed: 0
      cost: true              # params, GFLOPs, img/s, peak memory
      cost_batch_size: 32
      cost_iters: 10
      rois: true              # rois.png
      roi_images: 4
      device: null            # null: cuda if available, else cpu
      precision: fp32         # fp32 | bf16 | fp16 autocast for features and throughput

A ``pipe:`` shard URL runs a shell command: it is refused unless the caller opts in
(``allow_pipe=True``: ``--allow-pipe`` on the command line), never by a key of the run folder.

Relative paths in ``eval:`` are tried from the working directory, then from the run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from data.decode import DEFAULT_MAX_PIXELS

from .classify import classification_eval, head_applies
from .cost import compare_cost
from .features import aligned_output, extract, student_outputs, teacher_student_step
from .fidelity import fidelity
from .linear_probe import DEFAULT_CS, linear_probe, split_features, train_labels_of
from .rois import draw_rois
from .zeroshot import dataset_templates, resolve_classnames, zero_shot

SECTIONS = {
    "clip": ("zero_shot", "linear_probe", "fidelity", "cost", "rois"),
    "supervised": ("classification", "linear_probe", "fidelity", "cost", "rois"),
    "dino": ("linear_probe", "fidelity", "cost", "rois"),
}
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalConfig:
    """What to evaluate and on which data (the recipe's ``eval:`` keys; see the module docstring)."""

    data: Union[str, list, None] = None
    train_data: Union[str, list, None] = None
    classnames: Union[str, list, None] = None
    templates: Union[str, list, None] = None
    batch_size: int = 64
    num_workers: int = 2
    max_samples: Union[int, None] = None
    train_max_samples: Union[int, None] = None
    max_pixels: Union[int, None] = DEFAULT_MAX_PIXELS
    probe: bool = True
    probe_cs: Union[list, None] = None
    probe_val_fraction: float = 0.2
    probe_test_fraction: float = 0.5
    seed: int = 0
    cost: bool = True
    cost_batch_size: int = 32
    cost_iters: int = 10
    rois: bool = True
    roi_images: int = 4
    device: Union[str, None] = None
    precision: str = "fp32"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EvalConfig":
        """Build from a mapping; an unknown key is an error naming the nearest valid one."""
        names = [f.name for f in dataclasses.fields(cls)]
        d = dict(d or {})
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown eval option '{key}'.{hint} Valid options: {', '.join(names)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        """ValueError naming the first option whose value cannot work."""
        if self.precision not in _PRECISIONS:
            raise ValueError(f"eval precision {self.precision!r}: choose one of {', '.join(_PRECISIONS)}")
        at_least = dict(batch_size=1, cost_batch_size=1, cost_iters=1, roi_images=1, num_workers=0,
                        max_samples=1, train_max_samples=1, max_pixels=1)
        for key, low in at_least.items():
            value = getattr(self, key)
            optional = key.startswith(("max_", "train_max_"))
            if (value is None and optional) or (isinstance(value, int) and not isinstance(value, bool)
                                               and value >= low):
                continue
            raise ValueError(f"eval {key} must be an integer >= {low}{' or null' if optional else ''}, got {value!r}")
        for key in ("probe_val_fraction", "probe_test_fraction"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise ValueError(f"eval {key} must be a fraction strictly between 0 and 1, got {value!r}")
        if self.probe_cs is not None and (
                not isinstance(self.probe_cs, (list, tuple)) or not self.probe_cs
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in self.probe_cs)):
            raise ValueError(f"eval probe_cs must be a non-empty list of positive numbers or null, "
                             f"got {self.probe_cs!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exn:
                raise ValueError(f"eval device {self.device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") \
                    from exn

    def replace(self, **changes) -> "EvalConfig":
        """A copy with the non-None ``changes`` applied (command-line overrides)."""
        return EvalConfig.from_dict({**dataclasses.asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- evaluate
def _image_tower(teacher) -> nn.Module:
    """The teacher's parameters an image passes through (open_clip: ``model.visual``)."""
    return getattr(teacher.model, "visual", teacher.model)


def _student_fn(student: nn.Module, target: str):
    def fn(images):
        return aligned_output(target, *student_outputs(student, images))

    return fn


def _describe_teacher(teacher) -> dict:
    return dict(kind=teacher.kind, name=teacher.name, family=teacher.family, target=teacher.target,
                embed_dim=teacher.embed_dim, depth=teacher.depth, width=teacher.width,
                num_patches=teacher.num_patches, image_size=list(teacher.preprocess.size),
                spec=_jsonable(dict(teacher.spec)))


def _describe_student(student: nn.Module) -> dict:
    cfg = getattr(student, "config", None)
    out = dict(type=type(student).__name__, family=_family_name(student))
    if cfg is not None:
        out.update(latent_tokens=getattr(student, "num_tokens", None), cls_token=getattr(cfg, "has_cls_token", True),
                   embed_dim=cfg.embed_dim,
                   output_dim=cfg.output_dim, model_type=getattr(cfg, "model_type", None))
        if out["family"] not in (None, "sparseformer"):  # a whole ViT: its sequence, class token included
            out["tokens"] = str(getattr(student, "num_tokens", "?"))
    return out


def _family_name(student: nn.Module) -> str | None:
    from students.families import family_of

    try:
        return family_of(student).name
    except TypeError:  # e.g. a teacher standing in for a perfect student
        return None


# ----------------------------------------------------------------------------- what each family adds


def _rois_picture(student, images: Tensor, path: Path, teacher) -> None:
    draw_rois(student, images, path, teacher.preprocess.mean, teacher.preprocess.std)


def _kept_keys_picture(student, images: Tensor, path: Path, teacher) -> None:
    from .attention_maps import kept_keys_figure

    with torch.no_grad():
        masks = student.forward_details(images, attention=False).attn_masks
    mean = torch.tensor(teacher.preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(teacher.preprocess.std, device=images.device).view(1, 3, 1, 1)
    block = student.sparse_blocks[-1] if student.sparse_blocks else -1
    kept_keys_figure(images * std + mean, masks, path, block=block, num_prefix=student.num_prefix_tokens)


def _attention_cost(student, images: Tensor) -> dict:
    """Attention counted as executed and under the mask (the paper's accounting), with each block's density."""
    from .attention_cost import attention_cost

    with torch.no_grad():
        masks = student.forward_details(images, attention=False).attn_masks
    return attention_cost(student, masks).to_dict()


# family -> (report key, picture file, draw(student, images, path, teacher), section title, caption)
PICTURES = {
    "sparseformer": ("rois", "rois.png", _rois_picture, "Where the student looks",
                     "Each token's RoI and sampling points at every sampling stage, then the final RoIs."),
    "sparsifiner": ("kept_keys", "kept_keys.png", _kept_keys_picture, "What the student attends to",
                    "For a few query patches (red squares) of a few images, the keys each keeps in the last sparse "
                    "block (head 0), lit; the rest dimmed."),
}
# family -> a section of its own cost, measured on the evaluation images
EXTRA_COST = {"sparsifiner": _attention_cost}


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def evaluate(student: nn.Module, teacher, eval_source=None, out_dir: str | os.PathLike | None = None,
             config: EvalConfig | Mapping[str, Any] | None = None, progress: bool = True, allow_pipe: bool = False,
             **options) -> dict:
    """Evaluate ``student`` against ``teacher`` (see the module docstring); returns the report dict.

    ``eval_source`` (or ``config.data``) is the labelled evaluation set; ``options`` are
    ``EvalConfig`` fields overriding ``config``. With ``out_dir`` the report files are written.
    ``allow_pipe`` lets ``pipe:`` shard URLs run their commands.
    """
    from data.evalsets import build_eval_loader

    cfg = config if isinstance(config, EvalConfig) else EvalConfig.from_dict(config)
    cfg = cfg.replace(data=eval_source, **options)
    family = getattr(teacher, "family", None)
    if family not in SECTIONS:
        raise ValueError(f"teacher family {family!r} is not one of {', '.join(SECTIONS)}")
    sections = SECTIONS[family]
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast_dtype = _PRECISIONS[cfg.precision]
    out_dir = prepare_out_dir(out_dir) if out_dir is not None else None

    report: dict[str, Any] = dict(teacher=_describe_teacher(teacher), student=_describe_student(student),
                                  config=_jsonable(cfg.to_dict()), device=str(device), notes=[])
    notes = report["notes"]
    student_was_training = student.training
    student.eval()
    student.to(device)
    teacher.to(device)
    try:
        transform = teacher.eval_transform()
        if cfg.data is not None:
            loader, dataset_classnames = build_eval_loader(cfg.data, transform, cfg.batch_size, cfg.num_workers,
                                                           allow_pipe=allow_pipe, max_pixels=cfg.max_pixels)
            # Class names are checked before any feature is computed: the prompts' and the probe's.
            if "zero_shot" in sections:
                zero_shot_names = resolve_classnames(cfg.classnames, dataset_classnames)
            probe_train = probe_train_split(cfg, transform, dataset_classnames, allow_pipe)
            want_logits = "classification" in sections
            if want_logits:
                why = head_applies(teacher, len(dataset_classnames))
                if why:
                    notes.append(f"classification skipped: {why}")
                    want_logits = False
            features = extract(loader, teacher_student_step(teacher, student, logits=want_logits), device,
                               cfg.max_samples, autocast_dtype, desc="eval features", progress=progress)
            report["eval_set"] = dict(source=_jsonable(cfg.data), num_images=int(features["teacher"].shape[0]),
                                      num_classes=len(dataset_classnames), classnames=list(dataset_classnames),
                                      **_skips(loader))

            if "zero_shot" in sections:
                # None: the evaluation set's own templates if its dataset.json lists some, else openai.
                templates = cfg.templates if cfg.templates is not None else dataset_templates(cfg.data)
                report["zero_shot"] = zero_shot(features, teacher, zero_shot_names, templates, device)
                if templates is not cfg.templates:
                    report["zero_shot"]["templates"] = "the evaluation set's"
            if want_logits:
                report["classification"] = classification_eval(features)
            report["fidelity"] = fidelity(features["student"], features["teacher"])
            if cfg.probe:
                report["linear_probe"] = _probe(cfg, features, probe_train, teacher_student_step(teacher, student),
                                                device, autocast_dtype, progress)
            picture = PICTURES.get(_family_name(student))
            if cfg.rois and out_dir is not None and picture is not None:
                key, name, draw = picture[:3]
                draw(student, _first_images(loader, cfg.roi_images).to(device), out_dir / name, teacher)
                report[key] = name
            extra = EXTRA_COST.get(_family_name(student))
            if extra is not None and cfg.cost:
                report["attention_cost"] = extra(student, _first_images(loader, cfg.cost_batch_size).to(device))
        else:
            notes.append("no evaluation set (eval.data / --data): accuracy, fidelity and RoI pictures skipped")
        if cfg.cost:
            models = {"teacher": (teacher.embed, _image_tower(teacher)),
                      "student": (_student_fn(student, teacher.target), student)}
            report["cost"] = compare_cost(
                models, teacher.preprocess.size, batch_size=cfg.cost_batch_size, device=device, iters=cfg.cost_iters,
                warmup=min(3, cfg.cost_iters), autocast_dtype=autocast_dtype)
    finally:
        student.train(student_was_training)
    report = _jsonable(report)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _skips(loader) -> dict:
    """``num_skipped`` and ``skipped`` (name and error of each sample that did not decode)."""
    skipped = loader.skipped_report() if hasattr(loader, "skipped_report") else []
    return dict(num_skipped=len(skipped), skipped=skipped)


def probe_train_split(cfg: EvalConfig, transform, dataset_classnames, allow_pipe: bool = False):
    """The probe's train split, ``(loader, classnames, train label of each eval class)``, or None (no
    `train_data`, or no probe). The two sets' labels are matched by class name (refused where a class is missing)."""
    from data.evalsets import build_eval_loader

    if not cfg.probe or cfg.train_data is None:
        return None
    loader, train_classnames = build_eval_loader(cfg.train_data, transform, cfg.batch_size, cfg.num_workers,
                                                 allow_pipe=allow_pipe, max_pixels=cfg.max_pixels)
    return loader, train_classnames, train_labels_of(dataset_classnames, train_classnames, _jsonable(cfg.data),
                                                     _jsonable(cfg.train_data))


def _probe(cfg: EvalConfig, test_features, probe_train, step, device, autocast_dtype, progress,
           models: Sequence[str] = ("teacher", "student")) -> dict:
    """Linear probe of each of ``models`` (keys of ``step``'s output) on the train split or half the eval set;
    ``probe_train`` is ``(loader, classnames, train label of each eval class)`` or None."""
    probe_args = dict(Cs=cfg.probe_cs or DEFAULT_CS, val_fraction=cfg.probe_val_fraction, seed=cfg.seed)
    embeddings = (*models, "labels")
    test = {k: test_features[k] for k in embeddings}
    extra = {}
    if probe_train is not None:
        loader, train_classnames, train_label = probe_train
        train = extract(loader, step, device, cfg.train_max_samples,
                        autocast_dtype, desc="probe train features", progress=progress)
        test["labels"] = train_label[test["labels"]]  # the evaluation set's labels in the train split's terms
        split = f"train: {_jsonable(cfg.train_data)}"
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


def _first_images(loader, n: int) -> torch.Tensor:
    images = []
    for batch in loader:
        images.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n]


# ----------------------------------------------------------------------------- writing
def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create the report folder (before any work), or fail naming it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"the report folder {out_dir} is a file; give another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise OSError(f"cannot create the report folder {out_dir}: {exn.strerror or exn}; give another --out") \
            from exn
    return out_dir


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out_dir / "report.json", markdown=out_dir / "report.md")
    paths["json"].write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    paths["markdown"].write_text(to_markdown(report))
    return {k: str(v) for k, v in paths.items()}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _num(x, digits=2) -> str:
    if x is None:
        return "–"
    if 0 < abs(x) < 10 ** -(digits - 1):  # tiny models: keep three significant digits
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def _ratio(s, t) -> str:
    return "–" if s is None or t is None or not t else f"{s / t:.3f}"


def _side_by_side(rows: Sequence[tuple[str, Any, Any, Any]]) -> list[str]:
    lines = ["| | teacher | student | student / teacher |", "|---|---:|---:|---:|"]
    for name, fmt, t, s in rows:
        lines.append(f"| {name} | {fmt(t)} | {fmt(s)} | {_ratio(s, t)} |")
    return lines


def _accuracy_table(section: Mapping[str, Any]) -> list[str]:
    t, s = section["teacher"], section["student"]
    rows = [(f"top-{k}", _pct, t.get(f"top{k}"), s.get(f"top{k}")) for k in (1, 5) if f"top{k}" in t]
    return _side_by_side(rows)


def _skipped_line(skipped, which: str, show: int = 10) -> str:
    """`` N unreadable <which> images skipped: `a` (error), ...`` or ``""``."""
    if not skipped:
        return ""
    n = len(skipped)
    named = ", ".join(f"`{s['name']}` ({s['error']})" for s in skipped[:show])
    more = f", and {n - show} more (all in report.json)" if n > show else ""
    return f" {n} unreadable {which} image{'s' if n > 1 else ''} skipped: {named}{more}."


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: one table per section, teacher and student side by side."""
    t = report["teacher"]
    st = report.get("student", {})
    lines = [f"# Evaluation: {st.get('type', 'SparseFormer')} student of {t['kind']}:{t['name']} ({t['family']})", ""]
    cls = " + a class token" if st.get("cls_token") else ""
    tokens = "latent tokens" if st.get("family", "sparseformer") == "sparseformer" else "tokens"
    lines.append(f"Student: {st.get('type', '?')} with {st.get('latent_tokens', '?')} {tokens}{cls}; teacher: "
                 f"{t['depth']} blocks of width {t['width']}, {t['num_patches']} patches at "
                 f"{t['image_size'][0]}x{t['image_size'][1]}. Device: {report.get('device', '?')}.")
    if "eval_set" in report:
        e = report["eval_set"]
        lines.append(f"Evaluation set: `{e['source']}`, {e['num_images']} images, {e['num_classes']} classes."
                     + _skipped_line(e.get("skipped"), "evaluation"))
    lines.append("")

    if "zero_shot" in report:
        z = report["zero_shot"]
        lines += [f"## Zero-shot classification ({z['templates']} templates, {z['num_templates']} prompts per class)",
                  ""] + _accuracy_table(z)
        lines += ["", f"Agreement (same top-1 prediction): {_pct(z['agreement'])}. Chance top-1: "
                      f"{_pct(z['chance_top1'])} ({z['num_classes']} classes, {z['num_images']} images).", ""]
        if (z.get("logits") or {}).get("kind") == "sigmoid":
            lg, pr = z["logits"], z["top1_probability"]
            sign = "+" if lg["bias"] >= 0 else "−"
            lines += [f"Logits: sigmoid({lg['scale']:.4g} · cos {sign} {abs(lg['bias']):.4g}), the teacher's "
                      f"logit_scale and logit_bias (SigLIP). Mean probability of the top-1 class: teacher "
                      f"{pr['teacher']:.3g}, student {pr['student']:.3g}.", ""]
    if "classification" in report:
        c = report["classification"]
        lines += ["## Classification through the inherited head", ""] + _accuracy_table(c)
        lines += ["", f"Agreement (same top-1 prediction): {_pct(c['agreement'])}. Chance top-1: "
                      f"{_pct(c['chance_top1'])}.", ""]
    if "linear_probe" in report:
        p = report["linear_probe"]
        lines += ["## Linear probe (logistic regression on L2-normalised frozen features)", ""]
        lines += _accuracy_table(p)
        lines.append(f"| C chosen | {p['teacher']['C']:g} | {p['student']['C']:g} | |")
        lines += ["", f"Split: {p['split']} ({p['teacher']['num_train']} train / {p['teacher']['num_test']} test "
                      f"images); C chosen on a held-out part of the train split. Chance top-1: "
                      f"{_pct(p['chance_top1'])}."]
        if p.get("train_skipped"):
            lines.append(_skipped_line(p["train_skipped"], "train").strip())
        unconverged = [m for m in ("teacher", "student") if not p[m].get("converged", True)]
        if unconverged:
            lines.append(f"Warning: the logistic regression did not converge for {', '.join(unconverged)}.")
        lines.append("")
    if "fidelity" in report:
        f = report["fidelity"]
        lines += ["## Fidelity (student embedding against the teacher's, same images)", "",
                  "| measure | value | constant-embedding baseline |", "|---|---:|---:|",
                  f"| mean cosine | {f['cosine']:.4f} | can be high |",
                  f"| centred cosine (teacher mean removed) | {f['centred_cosine']:.4f} | ≈ 0 |",
                  f"| top-1 retrieval of own teacher embedding | {_pct(f['retrieval_top1'])} | "
                  f"{_pct(f['retrieval_chance'])} |", ""]
    if "cost" in report:
        ct, cs = report["cost"]["teacher"], report["cost"]["student"]
        lines += [f"## Cost (batch {ct['batch_size']} at {ct['image_size'][0]}x{ct['image_size'][1]}, "
                  f"{ct['device']})", ""]
        lines += _side_by_side([
            ("parameters (M)", _num, ct["params"] / 1e6, cs["params"] / 1e6),
            ("GFLOPs per image (2 per multiply-add)", _num, ct["gflops"], cs["gflops"]),
            ("GMACs per image", _num, ct["gmacs"], cs["gmacs"]),
            ("images / s", lambda x: _num(x, 1), ct.get("images_per_s"), cs.get("images_per_s")),
            ("peak memory (MB, weights + activations)", lambda x: _num(x, 1), ct.get("peak_mb"), cs.get("peak_mb")),
        ])
        lines += ["", "FLOPs counted with torch's FlopCounterMode (matrix products, convolutions, attention).", ""]
    if "attention_cost" in report:
        a = report["attention_cost"]
        lines += ["## Attention (multiply-adds per image of QKᵀ, AV and the connectivity predictor)", "",
                  "| block | kept keys (density) | executed GMACs | under the mask GMACs |", "|---:|---:|---:|---:|"]
        lines += [f"| {b['block']} | {_pct(b['density'])} | {b['executed_gmacs']:.4f} | {b['masked_gmacs']:.4f} |"
                  for b in a["blocks"]]
        lines += [f"| all | | {a['executed_gmacs']:.4f} | {a['masked_gmacs']:.4f} |", "",
                  f"Dense attention (QKᵀ and AV, no predictor): {a['dense_gmacs']:.4f} GMACs. Executed: what this "
                  f"code runs; under the mask: the paper's accounting (only the kept pairs, predictor included).", ""]
    for key, name, _, title, caption in PICTURES.values():
        if key in report:
            label = "RoIs" if key == "rois" else title
            lines += [f"## {title}", "", caption, "", f"![{label}]({report[key]})", ""]
    if report.get("compare"):  # written by eval.compare into the reports of the runs it compared
        lines += ["## Compared", "", f"Beside the teacher's other students and training-free baselines: "
                  f"[{report['compare']}]({report['compare']}).", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runs
def _resolve_path(value, run_dir: Path):
    """A relative path from the working directory if it exists there, else from the run folder."""
    if isinstance(value, (list, tuple)):
        return [_resolve_path(v, run_dir) for v in value]
    if not isinstance(value, str) or "://" in value or os.path.isabs(value) or os.path.exists(value):
        return value
    candidate = run_dir / value
    return str(candidate) if candidate.exists() else value


def yaml_problem(exn: Exception) -> str:
    """A YAML parse error in one line: the problem and where."""
    problem, mark = getattr(exn, "problem", None), getattr(exn, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exn).split())


def read_run(run_dir: str | os.PathLike) -> dict:
    """The recipe of a finished bootstrapping run, checked (cheap): its files are there and its teacher can be rebuilt."""
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist" if not run_dir.exists() else
                                f"{run_dir} is a file, not a run folder")
    needed = [run_dir / n for n in ("student_config.json", "student.safetensors", "recipe.yaml")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} is not a finished bootstrapping run: missing {', '.join(missing)} (a run writes "
            "student_config.json, student.safetensors and recipe.yaml at its end); or evaluate a student and "
            "teacher directly with --student/--teacher"
        )
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except yaml.YAMLError as exn:
        raise ValueError(f"{run_dir / 'recipe.yaml'} is not valid YAML: {yaml_problem(exn)}") from exn
    if not isinstance(recipe, Mapping):
        raise ValueError(f"{run_dir / 'recipe.yaml'} is not a recipe (a YAML mapping)")
    spec = recipe.get("teacher")
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"{run_dir / 'recipe.yaml'} has no 'teacher:' mapping (the teacher spec)")
    if spec.get("pretrained") in (None, False, "", "none", "false"):
        raise ValueError(
            f"the teacher of {run_dir} has random weights (pretrained: {spec.get('pretrained')!r}): rebuilding it "
            "gives a different teacher than the one the student learned from. Save the teacher's weights and set "
            "teacher.pretrained to that file in recipe.yaml, or call eval.evaluate(student, teacher, ...) with the "
            "teacher object itself"
        )
    return recipe


def load_run(run_dir: str | os.PathLike, recipe: Mapping | None = None):
    """``(student, teacher, recipe)`` of a bootstrapping run's output folder."""
    from teachers import create_teacher

    recipe = read_run(run_dir) if recipe is None else recipe
    return load_run_student(run_dir), create_teacher(dict(recipe["teacher"])), recipe


def load_run_student(run_dir: str | os.PathLike) -> nn.Module:
    """The student a finished bootstrapping run saved."""
    from students import load_student

    run_dir = Path(run_dir)
    return load_student(run_dir / "student_config.json", run_dir / "student.safetensors")


def evaluate_run(run_dir: str | os.PathLike, eval_source=None, out_dir: str | os.PathLike | None = None,
                 progress: bool = True, allow_pipe: bool = False, **options) -> dict:
    """Evaluate a bootstrapping run's student against its teacher; writes the report into ``out_dir``
    (default: the run folder). ``eval_source`` and ``options`` override the recipe's ``eval:`` keys;
    ``allow_pipe`` lets ``pipe:`` URLs run their commands (the run folder cannot opt in itself).

    The run folder, the options and the data paths are checked before any model is built."""
    from data.evalsets import check_eval_source

    run_dir = Path(run_dir)
    recipe = read_run(run_dir)
    cfg = EvalConfig.from_dict(recipe.get("eval") or {})
    cfg = cfg.replace(data=_resolve_path(cfg.data, run_dir), train_data=_resolve_path(cfg.train_data, run_dir))
    source = eval_source if eval_source is not None else cfg.data
    checked = cfg.replace(**options)
    if source is not None:
        check_eval_source(source, "evaluation data", allow_pipe)
        if checked.probe and checked.train_data is not None:
            check_eval_source(checked.train_data, "linear-probe train data", allow_pipe)
    out_dir = prepare_out_dir(out_dir if out_dir is not None else run_dir)
    student, teacher, recipe = load_run(run_dir, recipe)
    return evaluate(student, teacher, source, out_dir=out_dir, config=cfg, progress=progress, allow_pipe=allow_pipe,
                    **options)
