"""What a student family is, and what every student gives the run, the evaluation and the exports.

A family (SparseFormer, Sparsifiner, ...) is one package under `students/` and one `StudentFamily`
row of the table in `students.families`. The run, the evaluation bench and the exports talk to this
interface only; nothing outside a family's package knows its parameter names or its files.

The run (`bootstrap.train`) has one loop and asks the family for

* ``options``: the dataclass a recipe's ``student:`` section fills (``kind`` picks the family);
* ``build(teacher, options)``: the student built from its teacher and its parameter policy (a student that
  starts otherwise, from scratch or from saved weights, is made by `students.init.build_student`, with the
  family's ``scratch`` where it has one);
* ``phases(ctx)``: the `Phase` list, run one after the other. A phase names the steps it runs, its
  learning-rate schedule, what the student's training forward must return (``outputs``), and its
  `LossTerm` s, each with a weight, what it needs: the teacher targets (``embedding`` [B, D],
  ``tokens`` [B, N, C] final-normed, ``attention``: one [B, H, N, N] map per block) or the batch's
  ``labels`` ([B] class indices, or [B, C] soft targets after Mixup/CutMix), and a function of
  (student outputs, targets). The objective of the recipe (alignment, labels, distillation:
  ``ctx.objective``) becomes terms through `students.losses.objective_terms`;
* ``enter(student, policy, phase)``: set what trains (``requires_grad``) and the model's own phase
  switch, explicitly (no shared config is mutated);
* ``forward(student, images, outputs, pre_logits)``: the training forward of a phase.

Every student model keeps the `Student` contract (timm's conventions where timm has one).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

from data.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher

__all__ = ["BATCH_NEEDS", "ConfigError", "ConfigFile", "ExtraSection", "InitOptions", "LossTerm", "ParameterPolicy",
           "Phase", "PhaseContext", "PhasedParameterPolicy", "ReportPicture", "Student", "StudentEncoding",
           "StudentFamily", "TARGETS", "VisionDescription", "enter_objective_phase", "forward_outputs_of",
           "is_exempt_from_weight_decay", "policy_from", "read_json", "vit_tower_encoding"]

TARGETS = ("embedding", "tokens", "attention")
# What a loss term may need from the batch itself rather than from the teacher.
BATCH_NEEDS = ("labels",)


class ConfigError(UserError, ValueError):
    """A student configuration (or a family's options) that cannot describe a model."""


def read_json(path_or_text: str) -> Any:
    """A config's JSON, given as the text itself or as the path of a file holding it."""
    text = path_or_text
    if not path_or_text.lstrip().startswith("{"):
        with open(path_or_text) as f:
            text = f.read()
    return json.loads(text)


class ConfigFile:
    """The file side every family's config dataclass shares; the family writes `from_dict` (which validates) and
    may override `to_dict` (e.g. to leave unset optional keys out of a saved config)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path_or_text: str):
        return cls.from_dict(read_json(path_or_text))

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def replace(self, **changes):
        return type(self).from_dict({**self.to_dict(), **changes})


# ----------------------------------------------------------------------------- the student contract


@runtime_checkable
class Student(Protocol):
    """What every student model gives (the run, the evaluation and the exports use nothing else).

    ``config`` (the family's config, with ``to_dict`` / ``to_json``) and ``pretrained_cfg`` (input
    size, mean, std, interpolation, crop_pct: timm's) are attributes.
    """

    def forward(self, images: Tensor, pre_logits: bool = False) -> Tensor:
        """The head output [B, D] (with ``pre_logits``: the pooled, normed feature)."""

    def forward_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_logits, output)`` from one pass."""

    def forward_details(self, images: Tensor) -> Any:
        """The output with what the family can show of how it got there (RoIs, attention masks, ...)."""

    def forward_tokens(self, images: Tensor, layer: int = -1, class_token: bool = True) -> Tensor:
        """The tokens after block ``layer`` (LLaVA's and transformers' indexing; -1: the final-normed output)."""

    def forward_hidden_states(self, images: Tensor) -> list[Tensor]:
        """Every hidden state ``forward_tokens`` can select, from one pass."""

    def no_weight_decay(self) -> set[str]:
        """Names (or fnmatch patterns) of the parameters exempt from weight decay, as timm's models give."""


def is_exempt_from_weight_decay(name: str, param: nn.Parameter, exempt: Sequence[str]) -> bool:
    """timm's rule: 1-D parameters, biases and the parameters the model names in ``no_weight_decay()``."""
    return (param.ndim <= 1 or name.endswith(".bias") or name in exempt
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in exempt if any(c in pattern for c in "*?[")))


# ----------------------------------------------------------------------------- training


@dataclass
class InitOptions:
    """How a student starts: keys every family's options carry (a recipe's ``student.init``, ...); see
    `students.init`, which builds the student from them."""

    # teacher (the family's construction from its teacher) | scratch (the family's own initialisation) |
    # a named configuration (with `weights`) | a weights file (with `config`) or a run folder: fine-tuning
    init: str = "teacher"
    # The architecture of init scratch or of a weights file: a named configuration, a config JSON file, or the
    # config as a mapping (none, with init scratch: the one the teacher gives)
    config: str | dict | None = None
    config_overrides: dict | None = None  # keys of the config replaced (merged into mappings such as compatible_config)
    weights: str | None = None  # the weights file of init NAME (nothing is downloaded)
    image_size: int | None = None  # the input side of a config that has no preprocessing of its own (default 224)
    # The head's classes of a student started from scratch: filled by the run from the training data's class
    # names when it trains with labels (null: the config's)
    num_classes: int | None = None



@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a phase's loss: ``weight * fn(student_outputs, teacher_targets)``."""

    name: str
    weight: float
    needs: tuple[str, ...]  # teacher targets (TARGETS) and what the batch gives (BATCH_NEEDS)
    fn: Callable[[Mapping[str, Any], Mapping[str, Any]], Tensor]
    reads: tuple[str, ...] = ("embedding",)  # the student outputs ``fn`` reads


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own trainable parameters, optimizer schedule and loss."""

    name: str
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    outputs: tuple[str, ...]  # what the student's training forward returns (`StudentFamily.forward`)
    terms: tuple[LossTerm, ...]

    @property
    def needs(self) -> tuple[str, ...]:
        """The teacher targets the phase's terms need."""
        return tuple(t for t in TARGETS if any(t in term.needs for term in self.terms))

    @property
    def needs_labels(self) -> bool:
        """Whether a term needs the batch's labels."""
        return any("labels" in term.needs for term in self.terms)


@dataclass
class PhaseContext:
    """What a family's phases are made from (passed explicitly; nothing global is read)."""

    options: Any  # the family's options
    student: nn.Module
    teacher: "Teacher | None"  # None: a run without a teacher (training with labels alone)
    loss: Any  # bootstrap.config.LossConfig: the alignment loss
    optim: Any  # bootstrap.config.OptimConfig: lr, min_lr, warmup_steps, steps
    objective: Any = None  # bootstrap.config.ObjectiveConfig (None: alignment alone, weight 1)


@dataclass
class ParameterPolicy:
    """Which student parameters train and which stay frozen."""

    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    num_trainable: int = 0
    num_frozen: int = 0
    # Frozen because the aligned output stops before them (a head): a phase that reads the student's logits
    # (training with labels, distillation) trains them (`unfreeze`).
    logits_only: list[str] = field(default_factory=list)

    def apply(self, model: nn.Module) -> "ParameterPolicy":
        frozen = set(self.frozen)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        return self

    def freeze(self, model: nn.Module, prefix: str) -> "ParameterPolicy":
        """Move the parameters under ``prefix`` to the frozen side (lists and counts), and freeze them."""
        params = dict(model.named_parameters())
        for name in [n for n in self.trainable if n.startswith(prefix)]:
            self.trainable.remove(name)
            self.frozen.append(name)
            self.num_trainable -= params[name].numel()
            self.num_frozen += params[name].numel()
            params[name].requires_grad_(False)
        return self

    def unfreeze(self, model: nn.Module, names: Sequence[str]) -> "ParameterPolicy":
        """Move the parameters ``names`` to the trainable side (lists and counts), and let them train."""
        params = dict(model.named_parameters())
        for name in [n for n in names if n in self.frozen]:
            self.frozen.remove(name)
            self.trainable.append(name)
            self.num_frozen -= params[name].numel()
            self.num_trainable += params[name].numel()
            params[name].requires_grad_(True)
        return self

    def summary(self) -> str:
        total = self.num_trainable + self.num_frozen
        return (
            f"student parameters: {total / 1e6:.2f}M, trainable {self.num_trainable / 1e6:.2f}M "
            f"({100 * self.num_trainable / max(total, 1):.1f}%), frozen {self.num_frozen / 1e6:.2f}M"
        )

    def counts(self) -> dict:
        return {"trainable": self.num_trainable, "frozen": self.num_frozen}

    def to_dict(self) -> dict:
        return {"num_trainable": self.num_trainable, "num_frozen": self.num_frozen,
                "trainable": self.trainable, "frozen": self.frozen}


def policy_from(model: nn.Module, trains: Callable[[str], bool]) -> ParameterPolicy:
    """The policy that trains the parameters whose names ``trains`` accepts and freezes the rest."""
    policy = ParameterPolicy()
    for name, p in model.named_parameters():
        if trains(name):
            policy.trainable.append(name)
            policy.num_trainable += p.numel()
        else:
            policy.frozen.append(name)
            policy.num_frozen += p.numel()
    return policy


def enter_objective_phase(student: nn.Module, policy: ParameterPolicy, phase: Phase) -> ParameterPolicy:
    """A one-phase family's `enter`: the policy its construction applied, with the head trained where the phase
    reads the logits (`ParameterPolicy.logits_only`)."""
    if "logits" in phase.outputs and policy.logits_only:
        policy.unfreeze(student, policy.logits_only)
    return policy


def forward_outputs_of(student: nn.Module, images: Tensor, outputs: tuple[str, ...], pre_logits: bool) -> dict:
    """A family's training `forward` over the `Student` contract: the aligned embedding (pre-logits or the head's
    output), and the logits from the same pass where ``outputs`` asks for them."""
    if "logits" not in outputs:
        return {"embedding": student(images, pre_logits=pre_logits)}
    pre, logits = student.forward_outputs(images)
    return {"embedding": pre if pre_logits else logits, "logits": logits}


@dataclass
class PhasedParameterPolicy:
    """Which student parameters train in each phase: `policy["reconstruct"]`, `policy["sparse"]`."""

    phases: dict[str, ParameterPolicy] = field(default_factory=dict)

    def __getitem__(self, phase: str) -> ParameterPolicy:
        if phase not in self.phases:
            raise ValueError(f"unknown phase {phase!r}; the phases are {' and '.join(self.phases)}")
        return self.phases[phase]

    def apply(self, model: nn.Module, phase: str) -> ParameterPolicy:
        """Set `requires_grad` for `phase` and put the model in that phase; returns the phase's policy."""
        policy = self[phase].apply(model)
        model.set_phase(phase)
        return policy

    def summary(self) -> str:
        return "; ".join(f"{name}: {p.summary()}" for name, p in self.phases.items())

    def counts(self) -> dict:
        return {name: p.counts() for name, p in self.phases.items()}

    def to_dict(self) -> dict:
        return {name: p.to_dict() for name, p in self.phases.items()}


# ----------------------------------------------------------------------------- evaluation and exports


@dataclass(frozen=True)
class StudentEncoding:
    """One pass of a student, as a transformers vision model returns it."""

    hidden_states: list[Tensor]  # num_blocks + 1 raw states [B, L, C], class token first
    last_hidden_state: Tensor  # final-normed tokens [B, L, C]
    pooled: Tensor  # pooled, normed feature [B, C]
    embeds: Tensor  # projected output [B, D] (= pooled where the student has no projection)


@dataclass(frozen=True)
class VisionDescription:
    """What a transformers vision model needs of a family (`students.transformers_model`).

    describe: saved config -> dict(hidden_size, num_hidden_layers, num_latent_tokens, class_token,
        projection_dim): the token width, the number of blocks `forward_tokens` counts, the tokens
        besides the class token, whether there is one, the projected width (0: none).
    encode: (student, images) -> `StudentEncoding` in one pass.
    """

    describe: Callable[[Mapping[str, Any]], dict]
    encode: Callable[[nn.Module, Tensor], StudentEncoding]


def vit_tower_encoding(student: Any, images: Tensor) -> StudentEncoding:
    """A `VisionDescription.encode` for a student in timm's ViT layout (`forward_hidden_states`, `norm`,
    `forward_head`, `head`, `final_norm`)."""
    states = student.forward_hidden_states(images)
    # timm: the head pools `norm`'s tokens (fc_norm, where the tower has it, comes after the pooling)
    pooled = student.forward_head(student.norm(states[-1]), pre_logits=True)
    return StudentEncoding(states, student.final_norm(states[-1]), pooled, student.head(pooled))


@dataclass(frozen=True)
class ReportPicture:
    """A picture the evaluation report draws of a student: ``draw(student, images, path, mean, std)``
    writes a PNG of normalised ``images`` [B, 3, H, W]; ``key`` names it in report.json."""

    key: str
    file: str
    draw: Callable[..., Any]
    title: str
    caption: str


@dataclass(frozen=True)
class ExtraSection:
    """A section of the report only a family has: ``measure(student, images) -> dict`` (JSON-able), and
    ``markdown(section) -> lines`` of report.md."""

    key: str
    measure: Callable[[nn.Module, Tensor], dict]
    markdown: Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class StudentFamily:
    """One row of the family table (`students.families.FAMILIES`).

    name: the family's name (a recipe's ``student.kind``, a saved config's ``family`` field).
    config: the config class (`from_dict`, `to_dict`, `to_json`, `replace`), with the fields the evaluation and
        the exports read of any config: `embed_dim` (the pooled feature's width), `output_dim` (the head's, or
        `embed_dim` without one) and `drop_path_rate` (an export writes it as 0).
    models: the model classes; the first is built from a config.
    options: the recipe's ``student:`` options (a dataclass; ``kind`` is left out).
    build, phases, enter, forward: training (see the module docstring).
    steps: ``(options, optim) -> the steps of all phases``, without building anything.
    describe: ``(student, config) -> dict`` of what the report says of a student (its tokens).
    timm: the family's names in timm (`students.timm_registry.TimmNames`).
    vision: what a transformers vision model needs (`VisionDescription`).
    pictures, sections: what the evaluation report adds for this family.
    scratch: ``(config, num_classes) -> model`` with the family's own initialisation (``student.init: scratch``;
        ``num_classes`` None keeps the config's head), or None where the family cannot start from scratch
        (``no_scratch`` says why).
    named: ``name -> (config dict, pretrained_cfg dict)`` of the family's named configurations, or None.
    model_of: ``config -> model class`` where a family has several (SparseFormer: image or video).

    A family takes video when its options have a ``video`` field (`students.video`); its video students
    record their clips in their config's ``video`` section.
    """

    name: str
    config: type
    models: tuple[type, ...]
    options: type
    build: Callable[["Teacher", Any], tuple[nn.Module, Any]]
    phases: Callable[[PhaseContext], list[Phase]]
    enter: Callable[[nn.Module, Any, Phase], ParameterPolicy]
    forward: Callable[[nn.Module, Tensor, tuple[str, ...], bool], dict[str, Any]]
    steps: Callable[[Any, Any], int]
    describe: Callable[[nn.Module], dict]
    timm: Any  # students.timm_registry.TimmNames (which builds on this module)
    vision: VisionDescription
    pictures: tuple[ReportPicture, ...] = ()
    sections: tuple[ExtraSection, ...] = ()
    scratch: Callable[[Any, "int | None"], nn.Module] | None = None
    no_scratch: str = ""
    named: Callable[[str], tuple[dict, dict]] | None = None
    # The model class a config builds (a family with several, e.g. image and video models); None: `model`.
    model_of: Callable[[Any], type] | None = None

    @property
    def model(self) -> type:
        return self.models[0]

    def model_class(self, config) -> type:
        """The class of the model a config object (or its dict) builds."""
        config = self.config.from_dict(config)
        return self.model if self.model_of is None else self.model_of(config)

    def new(self, config) -> nn.Module:
        """A fresh model of this family from a config object or its dict."""
        config = self.config.from_dict(config)
        return self.model_class(config)(config)
