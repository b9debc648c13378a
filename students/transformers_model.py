"""Students as Hugging Face `transformers` vision models: LLaVA vision towers with 49-64 tokens.

    pip install "sparseformer-bootstrap[mllm]"

    import students.transformers_model as stm    # registers the classes with AutoConfig / AutoModel
    vision = stm.StudentVisionModel.from_student(student, pretrained_cfg=..., teacher=teacher_spec)
    vision.save_pretrained(DIR); stm.image_processor(vision.config).save_pretrained(DIR)   # or: save_folder
    llava = stm.build_llava(vision, LlamaConfig(...), vision_feature_layer=-2,
                            vision_feature_select_strategy="default")    # a LlavaForConditionalGeneration

The command line converts a bootstrapping run's student, or a released SparseFormer checkpoint:

    python -m students.to_transformers RUN_DIR OUT
    python -m students.to_transformers sparseformer_btsp_openai_clip_large OUT --weights CKPT.pth

What the model returns, with the meanings transformers gives them for CLIP (`CLIPVisionModel`):

* `hidden_states` (with `output_hidden_states`): `num_hidden_layers + 1` tensors [B, L, C], class
  token first: the tokens entering the first block, then the raw output of every block. For a
  SparseFormer a block is one of the trailing units over the final token set (the blocks inherited
  from the teacher; see `SparseFormer.forward_tokens`), so index k names the same block as in the
  teacher's CLIP hidden states.
* `last_hidden_state`: the final-normed tokens, `student.forward_tokens(x, layer=-1)` (as for
  transformers' ViT, DINOv2 and SigLIP; CLIP's own is the raw last block).
* `pooler_output`: the pooled, normed feature `student(x, pre_logits=True)` (CLIP: the normed class token).
* `image_embeds`: `student(x)`, the projected embedding (for a CLIP student, in its teacher's space).

So in a LLaVA built on it, `vision_feature_layer=L` feeds the projector `hidden_states[L]`, which is
`student.forward_tokens(x, L)` for every L but -1: `hidden_states[-1]` is the last block's raw output,
as with CLIP (LLaVA-1.5 uses -2). `vision_feature_select_strategy='default'` drops the class token
(`class_token=False`), `'full'` keeps it: 63 or 64 image tokens for the ViT-L/14 student instead of
CLIP's 576 or 577.

The student inside is built by `build_student`, i.e. `students.families.student_from_config`, the one
function that maps a saved config to a model of its family (SparseFormer or Sparsifiner). What the
transformers model needs beyond that is the family's `vision` description (`students.family.VisionDescription`):
its token counts from the config, and one pass that gives every hidden state.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from data.outputs import new_files_into, write_text
from teachers.base import hidden_state_index

from . import families
from .family import ConfigError

try:
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedModel, PretrainedConfig
    from transformers.modeling_outputs import BaseModelOutputWithPooling
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"students.transformers_model needs Hugging Face transformers ({e}); install the extra: "
        f"pip install 'sparseformer-bootstrap[mllm]' (or pip install transformers)") from e

__all__ = [
    "MODEL_TYPE",
    "StudentVisionConfig",
    "StudentVisionModel",
    "StudentVisionOutput",
    "attach_to_llava",
    "build_llava",
    "build_student",
    "image_processor",
    "is_clip_teacher",
    "llava_config",
    "llava_processor_kwargs",
    "save_folder",
]

MODEL_TYPE = "bootstrap_student"
SELECT_STRATEGIES = ("default", "full")


def build_student(config: Mapping[str, Any]) -> nn.Module:
    """The student a saved config describes, with fresh weights: `students.families.student_from_config`,
    the one function that maps a config to a model of its family."""
    return families.student_from_config(config)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
def is_clip_teacher(teacher: Mapping[str, Any] | None) -> bool:
    """Whether a teacher spec names a CLIP image tower (open_clip, or timm's `vit_*_clip_*`)."""
    if not teacher:
        return False
    return teacher.get("kind") == "openclip" or "clip" in str(teacher.get("model", "")).lower()


class StudentVisionConfig(PretrainedConfig):
    """A student as a transformers vision config.

    Saved: `student_config` (the student's own config; its `family` field picks the family),
    `preprocess_cfg` (the student's `pretrained_cfg`: input_size, mean, std, interpolation, crop_pct,
    optional resize_mode; not named
    `pretrained_cfg`, which would make transformers take the folder for a timm checkpoint) and
    `teacher` (the teacher spec it was bootstrapped from, or None). Derived from them on every load:
    `family`, `hidden_size`, `num_hidden_layers` (blocks), `image_size`, `num_latent_tokens`,
    `class_token`, `projection_dim`.
    """

    model_type = MODEL_TYPE

    def __init__(self, student_config: Mapping[str, Any] | None = None,
                 preprocess_cfg: Mapping[str, Any] | None = None, teacher: Mapping[str, Any] | None = None,
                 **kwargs):
        for derived in ("family", "hidden_size", "num_hidden_layers", "image_size", "num_latent_tokens",
                        "class_token", "projection_dim"):
            kwargs.pop(derived, None)  # written by to_dict for readers; recomputed here
        self.student_config = dict(student_config) if student_config is not None else None
        self.preprocess_cfg = _json(preprocess_cfg) if preprocess_cfg is not None else None
        self.teacher = _json(teacher) if teacher is not None else None
        self.family = None
        if self.student_config is not None:
            family = families.family_of(self.student_config)
            self.family = family.name
            for key, value in family.vision.describe(self.student_config).items():
                setattr(self, key, value)
        if self.preprocess_cfg is not None:
            self.image_size = list(self.preprocess_cfg["input_size"][1:])
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        """All output tokens, the class token included."""
        return self.num_latent_tokens + int(self.class_token)


def _json(d: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(d)))  # plain JSON types: tuples become lists


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
@dataclass
class StudentVisionOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` plus the student's projected embedding."""

    image_embeds: Tensor | None = None


class StudentVisionModel(PreTrainedModel):
    """A bootstrapped student as a transformers vision model (see the module docstring)."""

    config_class = StudentVisionConfig
    base_model_prefix = "student"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True  # the students' attention is torch's scaled_dot_product_attention already
    _no_split_modules = ["SFUnit"]

    def __init__(self, config: StudentVisionConfig):
        super().__init__(config)
        if config.student_config is None:
            raise ValueError("StudentVisionConfig has no student_config: build it with StudentVisionModel.from_student "
                             "or python -m students.to_transformers")
        self.student = build_student(config.student_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The student initialises itself when built; its weights come from a student or a checkpoint. Buffers
        that are computed rather than saved (a rotary module's frequencies, timm's `init_non_persistent_buffers`)
        are computed again: transformers builds the model on the meta device and leaves them empty."""
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    @classmethod
    def from_student(cls, student: nn.Module, *, pretrained_cfg: Mapping[str, Any] | None = None,
                     teacher: Mapping[str, Any] | None = None) -> "StudentVisionModel":
        """Wrap a trained student (a copy of its weights). `pretrained_cfg` defaults to the student's own."""
        family = families.family_of(student)
        if type(student) is not family.model:
            raise ConfigError(f"{type(student).__name__} is not an image student (a {family.model.__name__}); the "
                              f"transformers model takes images [B, 3, H, W]. A video student gives a video LLM its "
                              f"clip's tokens with forward_tokens(clips [B, T, 3, H, W]); python -m students.export "
                              f"writes it for timm or OpenCLIP")
        pcfg = pretrained_cfg or getattr(student, "pretrained_cfg", None)
        if not pcfg:
            raise ValueError("the student carries no pretrained_cfg (input size, mean, std): pass pretrained_cfg="
                             "dict(input_size=(3, H, W), mean=..., std=..., interpolation=..., crop_pct=...)")
        pcfg = {k: pcfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "resize_mode")
                if k in pcfg}
        # drop_path_rate is a training setting: the saved model is for inference.
        config = StudentVisionConfig(student_config=student.config.replace(drop_path_rate=0.0).to_dict(),
                                     preprocess_cfg=pcfg, teacher=teacher)
        model = cls(config)
        model.student.load_state_dict(student.state_dict())
        return model.to(next(student.parameters()).device).eval()

    def forward(self, pixel_values: Tensor, output_hidden_states: bool | int | list[int] | None = None,
                return_dict: bool | None = None, **kwargs) -> StudentVisionOutput | tuple:
        """`output_hidden_states`: a flag, or (transformers 5) the indices a caller will read: all are returned.

        Other keyword arguments (attention flags a LLaVA passes down) do not apply and are ignored.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        dtype = next(self.student.parameters()).dtype
        enc = families.family_named(self.config.family).vision.encode(self.student, pixel_values.to(dtype))
        # An index (even 0) or list of indices asks for hidden states; only None/False do not.
        want = output_hidden_states is not None and output_hidden_states is not False
        out = StudentVisionOutput(last_hidden_state=enc.last_hidden_state, pooler_output=enc.pooled,
                                  hidden_states=tuple(enc.hidden_states) if want else None, image_embeds=enc.embeds)
        return out if return_dict else out.to_tuple()


AutoConfig.register(MODEL_TYPE, StudentVisionConfig, exist_ok=True)
AutoModel.register(StudentVisionConfig, StudentVisionModel, exist_ok=True)


# --------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------
def image_processor(config: StudentVisionConfig | Mapping[str, Any]):
    """A `CLIPImageProcessor` doing the student's eval preprocessing: resize the shorter side to
    size / crop_pct (or squash to the size), centre-crop, scale to [0, 1], normalise."""
    from transformers import CLIPImageProcessor

    pcfg = config.preprocess_cfg if isinstance(config, StudentVisionConfig) else dict(config)
    if not pcfg:
        raise ValueError("no preprocess_cfg (input_size, mean, std, interpolation, crop_pct) to build the image "
                         "processor from")
    h, w = pcfg["input_size"][1:]
    crop_pct = float(pcfg.get("crop_pct", 1.0))
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(pcfg.get("interpolation", "bicubic"))
    if resample is None:
        raise ValueError(f"interpolation {pcfg['interpolation']!r} has no PIL equivalent; use bicubic or bilinear")
    common = dict(image_mean=list(pcfg["mean"]), image_std=list(pcfg["std"]), resample=resample,
                  do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    if pcfg.get("resize_mode", "shortest") == "squash":
        return CLIPImageProcessor(size={"height": h, "width": w}, do_center_crop=False, **common)
    if h == w:
        size = {"shortest_edge": math.floor(h / crop_pct)}
    else:
        size = {"height": math.floor(h / crop_pct), "width": math.floor(w / crop_pct)}
    return CLIPImageProcessor(size=size, crop_size={"height": h, "width": w}, do_center_crop=True, **common)


# --------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------
def _require_llava():
    try:  # LlavaModel (vision tower, projector, language model under `.model`) is the 4.52 layout
        return transformers.LlavaConfig, transformers.LlavaForConditionalGeneration, transformers.LlavaModel
    except (AttributeError, ImportError, RuntimeError) as e:  # the lazy module reports a failed import as any
        raise ImportError(
            f"transformers {transformers.__version__} has no LlavaForConditionalGeneration with a LlavaModel; "
            f"the LLaVA builders need transformers >= 4.52: pip install -U 'sparseformer-bootstrap[mllm]'") from e


def _check_selection(config: StudentVisionConfig, layer: int | list[int], strategy: str) -> int:
    """Validate LLaVA's feature selection for this student; returns the image tokens per image."""
    for i in [layer] if isinstance(layer, int) else list(layer):
        hidden_state_index(i, config.num_hidden_layers, "the student", name="vision_feature_layer")
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {strategy!r}: choose 'default' (drops the class token) "
                         f"or 'full' (keeps it)")
    if strategy == "default" and not config.class_token:
        raise ValueError("vision_feature_select_strategy 'default' drops the first token as the class token, but "
                         "this student has none (it would drop a latent token): use 'full'")
    return config.num_latent_tokens + int(strategy == "full" and config.class_token)


def llava_config(vision_config: StudentVisionConfig, text_config, *, vision_feature_layer: int | list[int] = -2,
                 vision_feature_select_strategy: str = "default", image_token_index: int | None = None,
                 **kwargs):
    """A `LlavaConfig` with the student as `vision_config` (selection checked against the student).

    `image_token_index` defaults to the last id of the text vocabulary; `image_seq_length` is the
    student's number of image tokens for the selection.
    """
    LlavaConfig, _, _ = _require_llava()
    tokens = _check_selection(vision_config, vision_feature_layer, vision_feature_select_strategy)
    if image_token_index is None:
        image_token_index = text_config.vocab_size - 1
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
                       vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=vision_feature_select_strategy, image_seq_length=tokens,
                       **kwargs)


def build_llava(vision: StudentVisionModel | StudentVisionConfig, text_config, **kwargs):
    """A `LlavaForConditionalGeneration` on the student, with a fresh projector and language model.

    With a `StudentVisionModel`, its weights become the vision tower's. Keyword arguments go to
    `llava_config` (vision_feature_layer, vision_feature_select_strategy, image_token_index, ...).
    """
    _, Llava, _ = _require_llava()
    config = vision.config if isinstance(vision, StudentVisionModel) else vision
    model = Llava(llava_config(config, text_config, **kwargs))
    if isinstance(vision, StudentVisionModel):
        model.model.vision_tower.load_state_dict(vision.state_dict())
    return model.eval()


def attach_to_llava(llava, vision: StudentVisionModel):
    """Put the student in place of a LLaVA's vision tower, keeping its trained projector.

    The projector was trained on a CLIP tower's tokens: the student must be bootstrapped from a CLIP
    teacher (recorded in `vision.config.teacher`) with that tower's width. The LLaVA's feature
    selection is kept. Returns `llava`, changed in place.
    """
    _require_llava()
    config = vision.config
    if not is_clip_teacher(config.teacher):
        what = "records no teacher" if not config.teacher else \
            f"was bootstrapped from {config.teacher.get('kind')}:{config.teacher.get('model')}, not a CLIP tower"
        raise ValueError(
            f"this student {what}; a LLaVA projector trained on CLIP tokens needs a student of the CLIP tower "
            f"(bootstrap one from the LLaVA's CLIP, e.g. openclip ViT-L-14-336 for LLaVA-1.5), or train a new "
            f"projector with build_llava")
    lc = llava.config
    tokens = _check_selection(config, lc.vision_feature_layer, lc.vision_feature_select_strategy)
    n_layers = 1 if isinstance(lc.vision_feature_layer, int) else len(lc.vision_feature_layer)
    expected = llava.model.multi_modal_projector.linear_1.in_features
    if config.hidden_size * n_layers != expected:
        raise ValueError(f"the LLaVA projector takes {expected} features per token but the student gives "
                         f"{config.hidden_size} x {n_layers} layers: the student's teacher is not this LLaVA's tower")
    device = next(llava.model.multi_modal_projector.parameters()).device
    llava.model.vision_tower = vision.to(device)
    lc.vision_config = config
    lc.image_seq_length = tokens
    return llava


def llava_processor_kwargs(config: StudentVisionConfig) -> dict:
    """`patch_size` and `num_additional_image_tokens` for a `LlavaProcessor` that expands `<image>` into
    the student's tokens (it counts (H // patch_size) * (W // patch_size) + additional, minus one for
    'default'); with them a processor writes exactly `num_image_tokens` (or one fewer) placeholders."""
    h, w = config.preprocess_cfg["input_size"][1:]
    patch = max(h, w)
    return dict(patch_size=patch, num_additional_image_tokens=config.num_image_tokens - (h // patch) * (w // patch))


# --------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------
# The reloaded model runs the same float32 ops on the same weights; memory-mapped weights are aligned
# differently, so CPU kernels may round differently (~1e-6 relative).
_TOL = 1e-5


def save_folder(vision: StudentVisionModel, out_dir: str | os.PathLike, *, overwrite: bool = False,
                verify: bool = True) -> Path:
    """Write the model (config.json, model.safetensors) and its image processor
    (preprocessor_config.json); with `verify`, reload it with AutoModel and compare the outputs."""
    out = Path(out_dir)
    existing = [f for f in ("config.json", "model.safetensors") if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a model ({', '.join(existing)}); choose another folder or "
                              f"pass overwrite=True (--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    with new_files_into(out) as tmp:  # new files, renamed over what is there (never written through a symlink)
        vision.save_pretrained(tmp)
        image_processor(vision.config).save_pretrained(tmp)
    write_text(out / "README.md", _README.format(tokens=vision.config.num_image_tokens,
                                                  blocks=vision.config.num_hidden_layers))
    if verify:
        reloaded = AutoModel.from_pretrained(out).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *vision.config.preprocess_cfg["input_size"], generator=g)
        device = next(vision.parameters()).device
        with torch.no_grad():
            a = vision(x.to(device), output_hidden_states=True)
            b = reloaded.to(device)(x.to(device), output_hidden_states=True)
        pairs = list(zip((a.last_hidden_state, a.pooler_output, a.image_embeds, *a.hidden_states),
                         (b.last_hidden_state, b.pooler_output, b.image_embeds, *b.hidden_states)))
        # Relative to each tensor's scale: an error upstream reaches tokens near zero undiminished.
        diff = max(((p - q).abs().max() / q.abs().max().clamp(min=1)).item() for p, q in pairs)
        if diff > _TOL:
            raise RuntimeError(f"the folder {out} does not reproduce the model (max |diff| {diff:.3g} of the "
                               f"largest value)")
    return out


_README = """\
# A bootstrapped student as a transformers vision model

{tokens} output tokens (class token included), {blocks} blocks. Registered with AutoConfig /
AutoModel by the `students` package of sparseformer-bootstrap:

    import students.transformers_model as stm
    from transformers import AutoModel, AutoImageProcessor
    vision = AutoModel.from_pretrained("THIS_FOLDER")
    processor = AutoImageProcessor.from_pretrained("THIS_FOLDER")
    llava = stm.build_llava(vision, text_config, vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
"""
