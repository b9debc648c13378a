"""`create_teacher(spec)`: validate a teacher spec and build the teacher it names.

A spec is a mapping (from YAML, a recipe, or code)::

    {kind: openclip, model: ViT-L-14-quickgelu, pretrained: openai}
    {kind: timm, model: vit_large_patch16_384.augreg_in21k_ft_in1k, pretrained: true}
    {kind: timm, model: vit_base_patch14_reg4_dinov2.lvd142m, pretrained: true, image_size: 224}

Keys:
    kind: 'openclip' | 'timm'.
    model: open_clip model name / timm model name (optionally with '.tag').
    pretrained: required, so that random weights are never an accident:
        a tag (open_clip: 'openai', 'laion2b_s32b_b79k', ...; timm: the part
        after the dot), true (timm: the default tag), a local weights file
        (.safetensors / .pt / .pth / .bin, timm also .npz; loaded safely,
        without network), or false / null for random weights (tests, demos;
        warns with `RandomTeacherWarning`).
    model_kwargs (timm): passed to timm.create_model (depth, embed_dim, img_size, reg_tokens, ...).
    model_cfg (openclip): a full open_clip model config {embed_dim, vision_cfg, text_cfg, quick_gelu?}.
    trust_remote_code (openclip): true lets an HF tokenizer run the Python files that come with it, where
        the model's config asks for that (`tokenizer_kwargs.trust_remote_code`); refused otherwise.
    cache_dir: where downloaded weights are cached (default: the Hugging Face cache).
    image_size: input size (int or [H, W]); DINOv2 builds at 518 unless told 224.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .base import Teacher, TeacherSpecError, closest

__all__ = ["KINDS", "SPEC_KEYS", "create_teacher", "resolve_spec"]

KINDS = ("openclip", "timm")
_COMMON_KEYS = ("kind", "model", "pretrained", "cache_dir", "image_size")
_KIND_KEYS = {"openclip": ("model_cfg", "trust_remote_code"), "timm": ("model_kwargs",)}
SPEC_KEYS = _COMMON_KEYS + tuple(k for keys in _KIND_KEYS.values() for k in keys)

_WEIGHT_SUFFIXES = {"openclip": (".safetensors", ".pt", ".pth", ".bin"),
                    "timm": (".safetensors", ".pt", ".pth", ".bin", ".npz")}
_FALSE_STRINGS = ("false", "none", "null")  # command-line overrides arrive as strings


def resolve_spec(spec: Mapping[str, Any]) -> tuple[dict, str, Any]:
    """Validate a spec; returns (spec as a plain dict, weights kind, weights source).

    weights kind: 'random' | 'default' (pretrained: true) | 'tag' | 'file'.
    """
    if not isinstance(spec, Mapping):
        raise TeacherSpecError(f"a teacher spec is a mapping like {{kind: timm, model: ..., pretrained: ...}}, "
                               f"got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in KINDS:
        what = "has no 'kind'" if kind is None else f"has unknown kind '{kind}'.{closest(str(kind), KINDS)}"
        raise TeacherSpecError(f"teacher spec {what} Valid kinds: {', '.join(KINDS)}")
    valid = _COMMON_KEYS + _KIND_KEYS[kind]
    for key in spec:
        if key not in valid:
            other = [k for k, keys in _KIND_KEYS.items() if key in keys]
            hint = f" ('{key}' is for kind {other[0]})" if other else closest(str(key), valid)
            raise TeacherSpecError(f"unknown key '{key}' in a {kind} teacher spec.{hint} "
                                   f"Valid keys: {', '.join(valid)}")
    if not isinstance(spec.get("model"), str) or not spec["model"]:
        raise TeacherSpecError(f"teacher spec needs 'model', a {kind} model name; got {spec.get('model')!r}")
    if "pretrained" not in spec:
        raise TeacherSpecError(
            "teacher spec needs 'pretrained': a tag, true (timm), a local weights file, or false/null for "
            "random weights (tests and demos only)")
    for key, types in (("model_kwargs", Mapping), ("model_cfg", Mapping), ("cache_dir", (str, os.PathLike))):
        if spec.get(key) is not None and not isinstance(spec[key], types):
            raise TeacherSpecError(f"'{key}' must be a {getattr(types, '__name__', 'path')}, got {spec[key]!r}")
    if not isinstance(spec.get("trust_remote_code", False), bool):
        raise TeacherSpecError(f"trust_remote_code must be true or false, got {spec['trust_remote_code']!r}")
    if spec.get("cache_dir") is not None:
        spec["cache_dir"] = str(spec["cache_dir"])
    spec["image_size"] = _image_size(spec.get("image_size"))
    if spec["image_size"] is None:
        del spec["image_size"]
    weights, source = _weights(kind, spec["pretrained"])
    if weights == "file":
        spec["pretrained"] = str(source)
    return spec, weights, source


def _image_size(size: Any):
    if size is None:
        return None
    if isinstance(size, int) and size > 0:
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return list(size)
    raise TeacherSpecError(f"image_size must be a positive int or [H, W], got {size!r}")


def _weights(kind: str, pretrained: Any) -> tuple[str, Any]:
    if pretrained is None or pretrained is False:
        return "random", None
    if pretrained is True:
        return "default", None
    if isinstance(pretrained, str) and pretrained.strip().lower() in _FALSE_STRINGS:
        return "random", None
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
        raise TeacherSpecError(f"pretrained must be a tag, true, a file path, or false/null; got {pretrained!r}")
    path = Path(pretrained).expanduser()
    looks_like_path = isinstance(pretrained, os.PathLike) or os.sep in str(pretrained) \
        or path.suffix in _WEIGHT_SUFFIXES[kind]
    if not looks_like_path:
        return "tag", str(pretrained)
    if not path.is_file():
        raise TeacherSpecError(f"pretrained weights file {path} does not exist (or is not a file)")
    if path.suffix not in _WEIGHT_SUFFIXES[kind]:
        raise TeacherSpecError(f"pretrained file {path} has suffix '{path.suffix}'; {kind} weights are "
                               f"{', '.join(_WEIGHT_SUFFIXES[kind])}")
    return "file", path.resolve()


def create_teacher(spec: Mapping[str, Any]) -> Teacher:
    """Build the frozen teacher a spec names (see the module docstring for the keys).

    Raises:
        TeacherSpecError: unknown kind/key/model/tag, or bad values.
        UnsupportedTeacherError: the model is not a plain class-token ViT (lists what is supported).
        TeacherWeightsError: weights that could not be downloaded or loaded (says how to supply them).
    """
    resolved, weights, source = resolve_spec(spec)
    if resolved["kind"] == "openclip":
        from .openclip import create_openclip_teacher

        return create_openclip_teacher(resolved, weights, source)
    from .timm_vit import create_timm_teacher

    return create_timm_teacher(resolved, weights, source)
