"""Typed SparseFormer configuration.

Round-trips to and from the JSON form used by the released checkpoints (and by
`tests/fixtures/golden/*.json`): ops by name, `compatible_config` as a mapping.
Switches that a JSON config leaves out take the bootstrapped ("btsp") era
defaults listed in `CompatibleConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from data.schema import check_keys
from teachers.rope import spec_problem

from ..blocks import ACTIVATIONS, MLP_LAYERS
from ..family import ConfigError, ConfigFile

OP_NAMES = ("ATTN", "MLP", "ROI_ADJ", "SAMPLING_M", "PE_INJECT")
ROI_OPS = ("ROI_ADJ", "SAMPLING_M", "PE_INJECT")
HEAD_OPS = ("avg", "cls", "map")
# A head op and the timm `global_pool` (and teacher `pool`) that pools alike ('cls' is also accepted as a pool).
HEAD_OP_TO_POOL = {"cls": "token", "avg": "avg", "map": "map"}
POOL_TO_HEAD_OP = {"token": "cls", "cls": "cls", "avg": "avg", "map": "map"}


@dataclass
class GridSampleConfig:
    mode: str = "bilinear"
    padding_mode: str = "border"
    align_corners: bool = False

    def validate(self) -> None:
        if self.mode not in ("bilinear", "nearest", "bicubic"):
            raise ConfigError(f"grid_sample_config.mode must be bilinear, nearest or bicubic, got {self.mode!r}")
        if self.padding_mode not in ("zeros", "border", "reflection"):
            raise ConfigError(
                f"grid_sample_config.padding_mode must be zeros, border or reflection, got {self.padding_mode!r}"
            )


@dataclass
class CompatibleConfig:
    """Switches that differ between SparseFormer v1 and the bootstrapped models.

    Defaults are the btsp-era values, used for keys a JSON config leaves out.
    """

    type_num_attn_heads: int = 2  # 1: 64 heads (head_dim = dim/64); 2: dim // head_dim heads
    type_op_adjust: int = 2  # 1: LN+Linear; 2: LN+Linear+GELU+Linear
    restrict_grad_norm: bool = False
    pg_inner_dim: Union[int, float] = 0.25  # int: width; float: fraction of dim
    transition_ln: bool = False
    mixing_bias: bool = False
    ln_eps: float = 1e-5
    use_stage_embedding: bool = True
    clip_quick_gelu: bool = False
    grid_sample_config: GridSampleConfig = field(default_factory=GridSampleConfig)
    # Extensions (not in released configs), left out of to_dict() at their defaults:
    # the head width for type_num_attn_heads=2 (released models use 64; a student of a
    # teacher with other head widths inherits the teacher's),
    head_dim: int = 64
    # and the kind of the blocks of units with repeats == 1 (the inherited teacher blocks; the
    # focusing unit keeps the plain GELU MLP): the MLP (`students.blocks.MLP_LAYERS`) and its
    # hidden width (timm's `hidden_features`; 0: 4 x the unit's width), its activation ('': GELU,
    # or QuickGELU with clip_quick_gelu; else one of `students.blocks.ACTIVATIONS`), and
    # LayerNorm qk-norm in the attention; EVA-02 CLIP's LayerNorms on the attention output before its projection
    # (`attn.norm`) and on the MLP's hidden features before fc2 (`mlp.norm`).
    mlp_layer: str = "mlp"
    mlp_hidden_dim: int = 0
    mlp_act: str = ""
    qk_norm: bool = False
    attn_norm: bool = False
    mlp_norm: bool = False
    # The normalisations of the authors' ImageNet training code (showlab/sparseformer imagenet/models/
    # sparseformer.py, which trained the v1 models) rather than of their released inference package: the early
    # convolution's per-pixel normalisation with the unbiased variance + 1e-7 (not the biased one + 1e-5), the
    # sampling offsets' std + 1e-7 (not + 1e-5) and the mixing generator's LayerNorm at ln_eps (not 1e-5).
    # Training v1 from scratch as the authors did sets it (with restrict_grad_norm).
    imagenet_code_norms: bool = False

    _EXTENSION_DEFAULTS = {"head_dim": 64, "mlp_layer": "mlp", "mlp_hidden_dim": 0, "mlp_act": "", "qk_norm": False,
                           "attn_norm": False, "mlp_norm": False, "imagenet_code_norms": False}

    def num_heads(self, dim: int) -> int:
        return 64 if self.type_num_attn_heads == 1 else dim // self.head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "CompatibleConfig":
        d = dict(d or {})
        check_keys(cls, d, "compatible_config", error=ConfigError)
        gs = d.pop("grid_sample_config", None)
        if isinstance(gs, GridSampleConfig):
            grid = gs
        else:
            gs = dict(gs or {})
            check_keys(GridSampleConfig, gs, "compatible_config.grid_sample_config", error=ConfigError)
            grid = GridSampleConfig(**gs)
        return cls(grid_sample_config=grid, **d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key, default in self._EXTENSION_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    def validate(self) -> None:
        if self.mlp_layer not in MLP_LAYERS:
            raise ConfigError(f"compatible_config.mlp_layer must be one of {', '.join(MLP_LAYERS)}, "
                              f"got {self.mlp_layer!r}")
        if self.mlp_act not in ("", *ACTIVATIONS):
            raise ConfigError(f"compatible_config.mlp_act must be '' or one of {', '.join(ACTIVATIONS)}, "
                              f"got {self.mlp_act!r}")
        if isinstance(self.mlp_hidden_dim, bool) or not isinstance(self.mlp_hidden_dim, int) or self.mlp_hidden_dim < 0:
            raise ConfigError(f"compatible_config.mlp_hidden_dim must be an integer >= 0 (0: 4 x width), "
                              f"got {self.mlp_hidden_dim!r}")


VIDEO_LAYOUTS = ("frames_first", "channels_first")
VIDEO_ROI_ENCODINGS = ("xy", "none")
SAMPLING_MODES = ("segments", "stride")  # data.video_transforms.ClipSampling's


@dataclass
class VideoConfig:
    """What makes a SparseFormer config a video student's (`MediaSparseFormer`): an extension, written only for
    video students. The authors' video model (a config without it) takes ``[B, 3, T, H, W]`` and encodes no RoI.

    frames, sampling, stride: the clips it was trained on (``data.video_transforms.ClipSampling``), which
        evaluation takes by default, as it takes an image student's input size from its pretrained config;
    replicates: every latent token is copied ``replicates`` times, copy k looking at the k-th of as many time
        segments of the clip (design note, section 7);
    layout: ``frames_first`` clips ``[B, T, 3, H, W]``, as the data, the teachers over frames and most video
        libraries give them (VideoMAE, LLaVA-OneVision), or ``channels_first`` ``[B, 3, T, H, W]`` (the authors');
    roi_encoding: ``xy`` encodes a tube's spatial box (x1, y1, x2, y2) as the image model encodes an RoI, so that
        a student inflated from an image student keeps what its PE_INJECT learned (a clip of one still frame gives
        the image student's output); ``none`` is the authors' zero vector.
    """

    frames: int = 8
    sampling: str = "segments"
    stride: int = 1
    replicates: int = 1
    layout: str = "frames_first"
    roi_encoding: str = "xy"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "VideoConfig") -> "VideoConfig":
        if isinstance(d, VideoConfig):
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"a SparseFormer config's 'video' must be a mapping (frames, replicates, ...), "
                              f"got {type(d).__name__}")
        check_keys(cls, d, "the video section of a SparseFormer config", error=ConfigError)
        return cls(**d)

    def validate(self) -> None:
        for name in ("frames", "stride", "replicates"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"video.{name} must be an integer >= 1, got {v!r}")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"video.sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.sampling!r}")
        if self.layout not in VIDEO_LAYOUTS:
            raise ConfigError(f"video.layout must be one of {', '.join(VIDEO_LAYOUTS)}, got {self.layout!r}")
        if self.roi_encoding not in VIDEO_ROI_ENCODINGS:
            raise ConfigError(f"video.roi_encoding must be one of {', '.join(VIDEO_ROI_ENCODINGS)}, "
                              f"got {self.roi_encoding!r}")


@dataclass
class SparseFormerConfig(ConfigFile):
    conv_dim: int
    num_latent_tokens: int
    num_sampling_points: int
    width_configs: list[int]
    repeats: list[int]
    ops_list: list[list[str]]
    head_op: str = "avg"
    same_token_embedding: bool = False
    cls_token_insert_layer: int = 0  # unit index; <= 0 means no class token
    proj_dim: int = 1000  # 0 means no projection (the head is the identity)
    proj_bias: bool = True
    drop_path_rate: float = 0.0
    compatible_config: CompatibleConfig = field(default_factory=CompatibleConfig)
    # Extensions for students of teachers not pooled by their class token (written only when set):
    # head_op 'map' pools with a MAP head (timm AttentionPoolLatent) built from `pool_spec`
    # (`students.blocks.map_pool`); 'avg' and 'map' pool the latent tokens (not the class token).
    # norm_before_pool: `norm` applies to every token before pooling (timm's `norm`, as SigLIP),
    # rather than to the pooled feature (timm's `fc_norm`; the same for class-token pooling).
    pool_spec: dict | None = None
    norm_before_pool: bool = False
    # pool_include_prefix: the MAP head (or mean) reads the class token too (PE-Core's MAP head).
    pool_include_prefix: bool = False
    # Students of teachers with rotary position embeddings: the teacher's rotary module as plain data
    # (`teachers.rope.RotaryPositions.spec`). The blocks after the last RoI op then rotate each latent token's
    # query and key by its RoI's centre on the teacher's patch grid (`SparseFormer.block_rotations`).
    rope: dict | None = None
    # A video student's clips, token copies over time, input layout and RoI encoding (`VideoConfig`; None: an
    # image model, or the authors' video model).
    video: VideoConfig | None = None
    # Metadata carried by released configs; not used by the computation.
    normalization_factor: list[list[float]] | None = None  # [mean, std]
    model_type: str | None = None

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SparseFormerConfig":
        if isinstance(d, SparseFormerConfig):
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"a SparseFormer config must be a mapping or SparseFormerConfig, got {type(d).__name__}")
        d = dict(d)
        check_keys(cls, d, "SparseFormer config", error=ConfigError)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"SparseFormer config is missing required key(s): {', '.join(missing)}")
        compat = d.pop("compatible_config", None)
        if not isinstance(compat, CompatibleConfig):
            compat = CompatibleConfig.from_dict(compat)
        d["width_configs"] = list(d["width_configs"])
        d["repeats"] = list(d["repeats"])
        d["ops_list"] = [list(ops) for ops in d["ops_list"]]
        if d.get("cls_token_insert_layer") is None:
            d["cls_token_insert_layer"] = 0
        if d.get("proj_dim") is None:
            d["proj_dim"] = 0
        if d.get("video") is not None:
            d["video"] = VideoConfig.from_dict(d["video"])
        cfg = cls(compatible_config=compat, **d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compatible_config"] = self.compatible_config.to_dict()
        # Optional keys are written only when set, so that a released config
        # round-trips to exactly the JSON it came from.
        for k, unset in (("normalization_factor", None), ("model_type", None),
                         ("drop_path_rate", 0.0), ("cls_token_insert_layer", 0), ("pool_spec", None),
                         ("norm_before_pool", False), ("pool_include_prefix", False), ("rope", None),
                         ("video", None)):
            if d[k] == unset:
                del d[k]
        return d

    # ----------------------------------------------------------- structure
    @property
    def num_units(self) -> int:
        return len(self.width_configs)

    @property
    def has_cls_token(self) -> bool:
        return self.cls_token_insert_layer > 0

    @property
    def embed_dim(self) -> int:
        """Width of the final tokens (the input of `norm`)."""
        return self.width_configs[-1]

    @property
    def output_dim(self) -> int:
        return self.proj_dim if self.proj_dim else self.embed_dim

    def validate(self) -> None:
        n = self.num_units
        if n == 0:
            raise ConfigError("width_configs is empty: a SparseFormer needs at least one unit")
        if len(self.repeats) != n or len(self.ops_list) != n:
            raise ConfigError(
                f"width_configs, repeats and ops_list must have one entry per unit; got "
                f"{len(self.width_configs)}, {len(self.repeats)} and {len(self.ops_list)}"
            )
        for name in ("conv_dim", "num_latent_tokens", "num_sampling_points"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for i, (w, r, ops) in enumerate(zip(self.width_configs, self.repeats, self.ops_list)):
            if not isinstance(w, int) or w <= 0:
                raise ConfigError(f"width_configs[{i}] must be a positive integer, got {w!r}")
            if not isinstance(r, int) or r <= 0:
                raise ConfigError(f"repeats[{i}] must be a positive integer, got {r!r}")
            for op in ops:
                if op not in OP_NAMES:
                    close = difflib.get_close_matches(str(op), OP_NAMES, n=1)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    raise ConfigError(f"unknown op '{op}' in ops_list[{i}].{hint} Valid ops: {', '.join(OP_NAMES)}")
            if "ATTN" in ops:
                heads = self.compatible_config.num_heads(w)
                if heads <= 0 or w % heads != 0:
                    raise ConfigError(
                        f"width_configs[{i}] = {w} cannot be split into {heads} attention heads "
                        f"(type_num_attn_heads={self.compatible_config.type_num_attn_heads}, "
                        f"head_dim={self.compatible_config.head_dim}); choose a width that the head count divides"
                    )
            if "PE_INJECT" in ops and w % 8 != 0:
                # dim/4 frequencies per RoI number, split into sin/cos halves.
                raise ConfigError(f"width_configs[{i}] = {w} must be a multiple of 8 for PE_INJECT")
            if self.has_cls_token and i >= self.cls_token_insert_layer:
                bad = [op for op in ops if op in ROI_OPS]
                if bad:
                    raise ConfigError(
                        f"ops_list[{i}] has {bad} after the class token is inserted "
                        f"(cls_token_insert_layer={self.cls_token_insert_layer}); only ATTN and MLP may follow it"
                    )
        if self.has_cls_token and self.cls_token_insert_layer >= n:
            raise ConfigError(
                f"cls_token_insert_layer={self.cls_token_insert_layer} is past the last unit (there are {n} units)"
            )
        if self.head_op not in HEAD_OPS:
            raise ConfigError(f"head_op must be one of {HEAD_OPS}, got {self.head_op!r}")
        if self.head_op == "cls" and not self.has_cls_token:
            raise ConfigError("head_op 'cls' needs a class token: set cls_token_insert_layer > 0")
        if (self.head_op == "map") != (self.pool_spec is not None):
            raise ConfigError("head_op 'map' and pool_spec go together: a MAP head is built from pool_spec "
                              "(students.blocks.POOL_SPEC_KEYS), and only head_op 'map' has one")
        if self.pool_include_prefix and self.head_op == "cls":
            raise ConfigError("pool_include_prefix: the class token's pooling ('cls') reads the class token alone; "
                              "it applies to head_op 'avg' or 'map'")
        if self.rope is not None:
            problem = spec_problem(self.rope)
            if problem:
                raise ConfigError(f"rope: {problem} (`teachers.rope.RotaryPositions.spec`)")
        self.compatible_config.validate()
        if self.compatible_config.type_num_attn_heads not in (1, 2):
            raise ConfigError("compatible_config.type_num_attn_heads must be 1 or 2")
        if self.compatible_config.type_op_adjust not in (1, 2):
            raise ConfigError("compatible_config.type_op_adjust must be 1 or 2")
        pg = self.compatible_config.pg_inner_dim
        if isinstance(pg, bool) or not isinstance(pg, (int, float)) or pg <= 0:
            raise ConfigError(f"compatible_config.pg_inner_dim must be a positive int or fraction, got {pg!r}")
        if self.proj_dim < 0:
            raise ConfigError(f"proj_dim must be >= 0 (0: no projection), got {self.proj_dim}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        self.compatible_config.grid_sample_config.validate()
        if self.video is not None:
            self.video.validate()
