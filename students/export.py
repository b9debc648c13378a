"""Export a student as a model folder that OpenCLIP or timm load with their own calls.

OpenCLIP (`export_openclip`, for students of CLIP teachers)::

    FOLDER/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    FOLDER/open_clip_model.safetensors  the full CLIP state dict
    FOLDER/<family>_config.json         the student's config (e.g. sparseformer_config.json)
    FOLDER/README.md

    from students.export import load_openclip_export
    model, preprocess, tokenizer = load_openclip_export("FOLDER")

which is `open_clip.create_model_and_transforms("local-dir:FOLDER")` and
`open_clip.get_tokenizer("local-dir:FOLDER")` (after `import students` those work
directly too) once the folder's config is checked to ask for no code of its own:
an HF tokenizer with `trust_remote_code: true` would run the folder's Python, so
such a folder is refused unless `trust_remote_code=True` is passed.

The image tower is open_clip's `TimmModel` around the student: `visual.trunk`
is the student without its output layer (`forward` returns the pooled,
normed features), `visual.head.proj` is the student's output layer
(`timm_pool: ''`, `timm_proj: 'linear'`; `'none'` for a student without one,
as SigLIP's, whose MAP head ends the tower). `model_cfg` is the teacher's own
config with `vision_cfg` replaced, so the text tower, `embed_dim`,
`quick_gelu`, `logit_scale` (and `logit_bias`) are the teacher's; the text
weights are copied from it. `encode_image` equals `student(x)` and
`encode_text` equals the teacher's. `vision_cfg.timm_model_name` is the
student's timm name (its family's `timm.timm_name`): a named configuration's, or
`<family>_cfg_<hash>`, which `import students` registers from the folder's
config file when open_clip opens the folder (see `students.timm_registry`).
`preprocess_cfg` is the student's input size,
mean, std and interpolation.

timm (`export_timm`, any student)::

    FOLDER/config.json         architecture, num_classes, pretrained_cfg (+ model_args)
    FOLDER/model.safetensors   the student's state dict

    import students, timm
    model = timm.create_model("local-dir:FOLDER", pretrained=True)

`architecture` is the named configuration's name when the student has one,
else the family's generic name (`sparseformer`, `sparsifiner`) with the
configuration in `model_args.config`.

Both exports reload what they wrote, the way a user would, and compare its
outputs with the student's (and the teacher's text tower) before returning.

From a bootstrapping run's output folder (`export_run`, and the command
line)::

    python -m students.export RUN_DIR [--out DIR] [--format auto|openclip|timm] [--overwrite]

The run folder (`students.run_folder`) holds `student.safetensors`,
`student_config.json`, `recipe.yaml` (its `teacher:` spec) and optionally
`pretrained_cfg.json`. `auto` exports to OpenCLIP when the teacher is an
open_clip CLIP (its text tower is rebuilt from the spec, which must name the
teacher's weights), else to timm.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from data.digest import file_sha256
from data.errors import UserError
from data.outputs import new_files_into, replacing, write_text

from .families import family_of
from .run_folder import RunFolder
from .video import input_shape

__all__ = ["export_openclip", "export_run", "export_timm", "load_openclip_export", "main", "openclip_model_cfg",
           "read_run", "teacher_pretrained_cfg"]

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"
FORMATS = ("auto", "openclip", "timm")
# The files that mark a folder as holding an export of that format.
# The files an export writes (an OpenCLIP export also writes its family's config file, e.g. sparseformer_config.json).
EXPORT_FILES = {"openclip": (OPENCLIP_CONFIG, OPENCLIP_WEIGHTS),
                "timm": (TIMM_CONFIG, TIMM_WEIGHTS)}
# Tolerance of the reload check: the reloaded model runs the same float32 ops on the same weights.
_ATOL = 1e-5
_PROBE_TEXTS = ["a photo of a dog.", "a diagram of a sparse transformer."]


class ExportError(UserError, RuntimeError):
    """An export that cannot be written, or whose reload does not reproduce the model."""


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _prepare_dir(out_dir: str | Path, files: tuple[str, ...], overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the export folder {out} is a file; choose another folder (--out)")
    existing = [f for f in files if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds an export ({', '.join(existing)}); "
                              f"choose another folder or pass overwrite=True (--overwrite)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise OSError(f"cannot create the export folder {out}: {exn.strerror or exn}; choose another "
                      f"folder (--out)") from exn
    return out


def _save_tensors(state_dict: Mapping[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared or strided storage: write independent contiguous CPU copies.
    with replacing(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}, str(tmp),
                  metadata=metadata)


def _check_student(student: Any):
    """The student's timm names (its family's registration, names and export fields)."""
    family = family_of(student)
    if type(student) is not family.model_class(student.config):
        # e.g. a MediaSparseFormer built without a video config: reloaded, its config would build another model.
        raise TypeError(f"the export takes a student its config rebuilds (a {family.model_class(student.config).__name__}"
                        f" for this config), got {type(student).__name__}")
    return family.timm


def _student_pretrained_cfg(student: nn.Module, pretrained_cfg: Mapping | None, fallback: Mapping | None) -> dict:
    """input_size/mean/std/interpolation/crop_pct: explicit > the student's own > the teacher's (fallback)."""
    tm = _check_student(student)
    for source in (pretrained_cfg, getattr(student, "pretrained_cfg", None), fallback):
        if source:
            return tm.pretrained_cfg_for(student.config, source)
    raise ExportError("the student carries no pretrained_cfg (input size, mean, std): pass "
                      "pretrained_cfg=dict(input_size=(3, H, W), mean=..., std=..., interpolation=..., crop_pct=...)")


def _probe_images(student: nn.Module, pcfg: Mapping, device: torch.device, batch: int = 2) -> torch.Tensor:
    """Random inputs of the student: images at its input size, or clips of a video student."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_shape(student, tuple(pcfg["input_size"][1:])), generator=g).to(device)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class _eval_mode:
    """Run a block with modules in eval mode, restoring their training flags afterwards."""

    def __init__(self, *modules: nn.Module):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.flags = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, flag in zip(self.modules, self.flags):
            m.train(flag)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------
def export_timm(student: nn.Module, out_dir: str | Path, *, pretrained_cfg: Mapping | None = None,
                overwrite: bool = False, verify: bool = True) -> Path:
    """Write `student` as a timm model folder (`config.json` + `model.safetensors`).

    `pretrained_cfg` (input_size, mean, std, interpolation, crop_pct) defaults
    to `student.pretrained_cfg`. With `verify`, the folder is reloaded with
    `timm.create_model("local-dir:...", pretrained=True)` and its output
    compared with the student's.
    """
    tm = _check_student(student)
    pcfg = _student_pretrained_cfg(student, pretrained_cfg, None)
    out = _prepare_dir(out_dir, EXPORT_FILES["timm"], overwrite)
    cfg = student.config
    arch = tm.released_name(cfg)
    fields = tm.export_fields(cfg)
    config = {
        "architecture": arch or tm.generic_name,
        "num_classes": fields["num_classes"],
        "num_features": fields["num_features"],
        "global_pool": fields["global_pool"],
    }
    if arch is None:
        # timm passes model_args to the entrypoint: `sparseformer(config=...)` rebuilds this architecture.
        config["model_args"] = {"config": cfg.replace(drop_path_rate=0.0).to_dict()}
    config["pretrained_cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in pcfg.items()}
    write_text(out / TIMM_CONFIG, json.dumps(config, indent=2))
    _save_tensors(student.state_dict(), out / TIMM_WEIGHTS, {"format": "pt"})
    if verify:
        _verify_timm(student, out, pcfg)
    return out


def _verify_timm(student: nn.Module, out: Path, pcfg: Mapping) -> None:
    import timm

    device = _device_of(student)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).to(device).eval()
    x = _probe_images(student, pcfg, device)
    with torch.no_grad(), _eval_mode(student):
        diff = _max_diff(reloaded(x), student(x))
    if diff > _ATOL:
        raise ExportError(f"the timm export in {out} does not reproduce the student (max |diff| {diff:.3g})")


# --------------------------------------------------------------------------
# OpenCLIP
# --------------------------------------------------------------------------
def _clip_and_cfg(teacher: Any, model_cfg: str | Mapping | None) -> tuple[nn.Module, dict]:
    """The open_clip CLIP module of `teacher` and the open_clip config it was built from."""
    import open_clip

    clip = getattr(teacher, "model", teacher)  # a teachers.Teacher wraps the CLIP as .model
    if not (hasattr(clip, "encode_text") and hasattr(clip, "logit_scale")):
        raise TypeError(f"export_openclip needs a CLIP teacher (teachers.Teacher of family 'clip' or an open_clip "
                        f"CLIP model with a text tower), got {type(clip).__name__}")
    spec = getattr(teacher, "spec", None) or {}
    if model_cfg is None:
        model_cfg = spec.get("model_cfg") or spec.get("model")
    if isinstance(model_cfg, str):
        name = model_cfg
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config '{name}'; pass model_cfg= the config mapping the "
                             f"teacher was built from")
    if not isinstance(model_cfg, Mapping):
        raise ValueError("cannot tell which open_clip config this CLIP was built from: pass model_cfg= its model "
                         "name (e.g. 'ViT-B-16-quickgelu') or its config mapping")
    return clip, copy.deepcopy(dict(model_cfg))


def openclip_model_cfg(student: nn.Module, teacher_cfg: Mapping, pretrained_cfg: Mapping) -> dict:
    """The teacher's open_clip config with the student as a timm image tower."""
    tm = _check_student(student)
    cfg = student.config
    fields = tm.export_fields(cfg)
    embed_dim = teacher_cfg["embed_dim"]
    # A student without a projection (SigLIP's tower has none: its MAP head is the output) is the tower.
    projected = fields["num_classes"] != 0
    if (fields["num_classes"] if projected else fields["num_features"]) != embed_dim:
        raise ExportError(
            f"the student projects to {fields['num_classes'] or fields['num_features']} dims but the teacher's "
            f"CLIP embedding has "
            f"{embed_dim}: export_openclip needs a student bootstrapped from this CLIP teacher (with its projection)")
    h, w = pretrained_cfg["input_size"][1:]
    out = copy.deepcopy(dict(teacher_cfg))
    out["vision_cfg"] = {
        "image_size": h if h == w else [h, w],
        "timm_model_name": tm.timm_name(cfg),
        "timm_model_pretrained": False,
        "timm_pool": "",  # the trunk pools itself (class token, mean or MAP head)
        "timm_proj": "linear" if projected else "none",  # visual.head.proj = the student's proj
    }
    if projected:
        out["vision_cfg"]["timm_proj_bias"] = fields["proj_bias"]
    return out


def _openclip_preprocess_cfg(pcfg: Mapping, resize_mode: str) -> dict:
    h, w = pcfg["input_size"][1:]
    if resize_mode == "shortest" and float(pcfg.get("crop_pct", 1.0)) != 1.0:
        warnings.warn(f"crop_pct={pcfg['crop_pct']} is not expressible in open_clip's preprocessing (it resizes the "
                      f"shorter side to the input size and centre-crops, i.e. crop_pct 1.0)", stacklevel=3)
    return {"size": h if h == w else [h, w], "mode": "RGB", "mean": list(pcfg["mean"]), "std": list(pcfg["std"]),
            "interpolation": pcfg["interpolation"], "resize_mode": resize_mode}


def _openclip_state_dict(student: nn.Module, clip: nn.Module) -> dict[str, torch.Tensor]:
    """Teacher's state dict with its image tower replaced by the student (TimmModel layout)."""
    sd = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    head = _check_student(student).head + "."
    for k, v in student.state_dict().items():
        if k.startswith(head):
            sd["visual.head.proj." + k[len(head):]] = v
        else:
            sd["visual.trunk." + k] = v
    return sd


def _save_hf_tokenizer(teacher: Any, out: Path) -> None:
    """open_clip reads an HF tokenizer of a `local-dir:` model from the folder itself."""
    tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise ExportError("the teacher's text config names an HF tokenizer (hf_tokenizer_name), which "
                          "open_clip loads from the export folder: export from a teachers.Teacher whose "
                          "tokenizer has save_pretrained")
    with new_files_into(out) as tmp:
        tokenizer.save_pretrained(str(tmp))


def export_openclip(student: nn.Module, teacher: Any, out_dir: str | Path, *,
                    model_cfg: str | Mapping | None = None, pretrained_cfg: Mapping | None = None,
                    overwrite: bool = False, verify: bool = True) -> Path:
    """Write a CLIP-bootstrapped student and its teacher's text tower as an OpenCLIP model folder.

    Args:
        student: the student (its output layer maps to the teacher's CLIP embedding).
        teacher: a `teachers.Teacher` of family 'clip', or an open_clip CLIP model.
        out_dir: the folder to write.
        model_cfg: the open_clip config the teacher was built from (a model name or mapping);
            read from `teacher.spec` when the teacher is a `teachers.Teacher`.
        pretrained_cfg: the student's input_size/mean/std/interpolation/crop_pct; default
            `student.pretrained_cfg`, else the teacher's preprocessing.
        overwrite: replace an export already in `out_dir`.
        verify: reload the folder with open_clip and check `encode_image` against the
            student and `encode_text` against the teacher.
    Returns:
        `out_dir` as a Path; load it with `open_clip.create_model_and_transforms("local-dir:" + str(out))`.
    """
    tm = _check_student(student)
    clip, teacher_cfg = _clip_and_cfg(teacher, model_cfg)
    teacher_pp = getattr(clip.visual, "preprocess_cfg", None) or {}
    fallback = None
    if teacher_pp:
        size = teacher_pp.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        fallback = dict(input_size=(3, *size), mean=teacher_pp.get("mean"), std=teacher_pp.get("std"),
                        interpolation=teacher_pp.get("interpolation", "bicubic"), crop_pct=1.0)
    pcfg = _student_pretrained_cfg(student, pretrained_cfg, fallback)
    resize_mode = (pretrained_cfg or {}).get("resize_mode") or teacher_pp.get("resize_mode") or "shortest"

    out = _prepare_dir(out_dir, (*EXPORT_FILES["openclip"], tm.config_file), overwrite)
    oc_cfg = openclip_model_cfg(student, teacher_cfg, pcfg)
    if (oc_cfg.get("text_cfg") or {}).get("hf_tokenizer_name"):
        _save_hf_tokenizer(teacher, out)
    write_text(out / tm.config_file, student.config.replace(drop_path_rate=0.0).to_json())
    write_text(out / OPENCLIP_CONFIG, json.dumps(
        {"model_cfg": oc_cfg, "preprocess_cfg": _openclip_preprocess_cfg(pcfg, resize_mode)}, indent=2))
    _save_tensors(_openclip_state_dict(student, clip), out / OPENCLIP_WEIGHTS, {"format": "pt"})
    write_text(out / "README.md", _README.format(name=oc_cfg["vision_cfg"]["timm_model_name"],
                                                  config_file=tm.config_file,
                                                  snippet=_openclip_snippet("THIS_FOLDER", indent="    ")))
    if verify:
        _verify_openclip(student, clip, getattr(teacher, "tokenizer", None), out, pcfg)
    return out


_README = """\
# A student with its CLIP teacher's text tower (OpenCLIP format)

The image tower is the student `{name}` (timm model name), registered with
timm by the `students` package of sparseformer-bootstrap:

{snippet}

`load_openclip_export` checks that the folder's config asks for no Python of its own to run (an HF
tokenizer with `trust_remote_code: true`) and then calls open_clip's
`create_model_and_transforms` and `get_tokenizer` on `local-dir:THIS_FOLDER`.

`{config_file}` is the student's configuration (also readable by
`students.load_student`).
"""


def _openclip_snippet(folder: str | Path, indent: str = "") -> str:
    return (f"{indent}from students.export import load_openclip_export\n"
            f"{indent}model, preprocess, tokenizer = load_openclip_export({str(folder)!r})")


def load_openclip_export(folder: str | Path, *, trust_remote_code: bool = False, **kwargs: Any):
    """`(model, preprocess, tokenizer)` of an OpenCLIP model folder (an export, or any `local-dir:` folder):
    `open_clip.create_model_and_transforms` (`kwargs` go to it) and `open_clip.get_tokenizer`, once its
    `open_clip_config.json` is checked to ask for no Python of its own to run. open_clip hands a config's
    `text_cfg.tokenizer_kwargs` to transformers' `AutoTokenizer`, which with `trust_remote_code: true` imports
    the tokenizer's Python files from the folder: such a folder is refused unless `trust_remote_code=True`."""
    import open_clip

    from teachers.openclip import local_dir_remote_code, remote_code_refusal

    name = f"local-dir:{folder}"
    asked = local_dir_remote_code(name)
    if asked and not trust_remote_code:
        raise ExportError(remote_code_refusal(str(Path(folder) / OPENCLIP_CONFIG), asked,
                                              "load_openclip_export(..., trust_remote_code=True)"))
    model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
    return model, preprocess, open_clip.get_tokenizer(name)


def _verify_openclip(student: nn.Module, clip: nn.Module, tokenizer: Any, out: Path, pcfg: Mapping) -> None:
    import open_clip

    device = _device_of(student)
    name = f"local-dir:{out}"
    reloaded = open_clip.create_model(name, device=device).eval()
    reloaded_tok = open_clip.get_tokenizer(name)
    tokens = reloaded_tok(_PROBE_TEXTS)
    if tokenizer is not None and not torch.equal(tokenizer(_PROBE_TEXTS), tokens):
        raise ExportError(f"open_clip.get_tokenizer('{name}') does not tokenise like the teacher's tokenizer")
    x = _probe_images(student, pcfg, device)
    with torch.no_grad(), _eval_mode(student, clip):
        image_diff = _max_diff(reloaded.encode_image(x), student(x))
        text_diff = _max_diff(reloaded.encode_text(tokens.to(device)),
                              clip.encode_text(tokens.to(_device_of(clip))).to(device))
    if image_diff > _ATOL or text_diff > _ATOL:
        raise ExportError(f"the OpenCLIP export in {out} does not reproduce its sources: max |diff| "
                          f"{image_diff:.3g} for encode_image vs the student, {text_diff:.3g} for encode_text "
                          f"vs the teacher")
    for name in ("logit_scale", "logit_bias"):  # SigLIP's sigmoid logits need both
        ours, theirs = getattr(reloaded, name, None), getattr(clip, name, None)
        if (ours is None) != (theirs is None) or (ours is not None and _max_diff(ours, theirs.to(device)) > 0):
            raise ExportError(f"the OpenCLIP export in {out} does not keep the teacher's {name}")


# --------------------------------------------------------------------------
# A bootstrapping run's output folder
# --------------------------------------------------------------------------
def read_run(run_dir: str | Path) -> tuple[nn.Module, dict, dict | None]:
    """A finished run's student, its teacher spec, and its pretrained_cfg (None if the run wrote none)."""
    folder = RunFolder.finished(run_dir)
    return folder.load_student(), folder.teacher_spec() if folder.has_teacher() else {}, folder.pretrained_cfg()


def teacher_pretrained_cfg(teacher: Any) -> dict:
    """A student's pretrained_cfg from its teacher's preprocessing (for runs without pretrained_cfg.json)."""
    return {**teacher.preprocess.timm_cfg(), "resize_mode": teacher.preprocess.resize_mode}


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, fmt: str = "auto", *,
               overwrite: bool = False, verify: bool = True) -> Path:
    """Export the student of a bootstrapping run folder; returns the export folder.

    fmt 'auto': OpenCLIP when the teacher spec is an open_clip CLIP (kind
    'openclip'), else timm. `out_dir` defaults to `RUN_DIR/export_openclip` or
    `RUN_DIR/export_timm`. The OpenCLIP export rebuilds the teacher from the
    recipe's spec (for its text tower); so does a timm export of a run without
    `pretrained_cfg.json` (for its preprocessing).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    folder = RunFolder.finished(run_dir)
    spec = folder.teacher_spec() if folder.has_teacher() else {}  # a run with labels alone has no teacher
    student, pcfg = folder.load_student(), folder.pretrained_cfg()
    if fmt == "auto":
        fmt = "openclip" if spec.get("kind") == "openclip" else "timm"
    if fmt == "openclip" and not spec:
        raise ValueError("the run trained without a teacher, so there is no text tower to export with it; export it "
                         "with --format timm")
    if fmt == "openclip" and spec.get("kind") != "openclip":
        raise ValueError(f"the run's teacher ({spec.get('kind')}:{spec.get('model')}) is not an open_clip CLIP "
                         f"and has no text tower; export it with --format timm")
    out = Path(out_dir) if out_dir is not None else folder.file(f"export_{fmt}")
    source = {"run": str(folder.path.resolve()), "format": fmt,
              "student_sha256": file_sha256(folder.file(RunFolder.STUDENT_WEIGHTS))}
    if not overwrite and _exported(out, fmt) and _read_source(out) == source:
        raise AlreadyExported(out)  # this very student is there already: nothing to write
    _prepare_dir(out, EXPORT_FILES[fmt], overwrite)  # before the teacher is built: fail early
    teacher = None
    if fmt == "openclip":  # the text tower: the very teacher the student learned from
        teacher = folder.build_teacher()
    elif pcfg is None:  # only the teacher's preprocessing, which its weights do not change
        from teachers import create_teacher

        teacher = create_teacher(spec)
    if pcfg is None:
        pcfg = teacher_pretrained_cfg(teacher)
    if fmt == "openclip":
        export_openclip(student, teacher, out, pretrained_cfg=pcfg, overwrite=overwrite, verify=verify)
    else:
        export_timm(student, out, pretrained_cfg=pcfg, overwrite=overwrite, verify=verify)
    write_text(out / SOURCE_FILE, json.dumps(source, indent=1) + "\n")
    return out


# What an export of a run records of its source: the run folder and its student's SHA-256.
SOURCE_FILE = "export_source.json"


class AlreadyExported(FileExistsError):
    """The export folder already holds this run's student, exported: said so, and nothing is written."""

    def __init__(self, out: Path):
        super().__init__(f"{out} already holds this run's export (of the same student.safetensors): load it from "
                         f"there (see its README.md), or pass --overwrite (overwrite=True) to write it again")
        self.out = out


def _load_snippet(out: Path) -> str:
    if (out / OPENCLIP_CONFIG).is_file():
        return _openclip_snippet(out)
    return f"import students, timm\nmodel = timm.create_model('local-dir:{out}', pretrained=True)"


def _exported(out: Path, fmt: str) -> bool:
    return all((out / name).is_file() for name in EXPORT_FILES[fmt])


def _read_source(out: Path) -> dict | None:
    try:
        return json.loads((out / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m students.export",
        description="Export the student of a bootstrapping run as an OpenCLIP or timm model folder.")
    parser.add_argument("run_dir", help="the run's output folder (student.safetensors, student_config.json, "
                                        "recipe.yaml, optionally pretrained_cfg.json)")
    parser.add_argument("--out", default=None, help="export folder (default: RUN_DIR/export_<format>)")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="openclip (CLIP teachers: student + teacher's text tower), timm, or auto (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in the folder")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the export to compare outputs")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.format, overwrite=args.overwrite, verify=not args.no_verify)
    except (UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}\nload it with:\n{_load_snippet(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
