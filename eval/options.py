"""What to evaluate and on which data: a recipe's ``eval:`` keys (and the command lines' options).

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
      probe: true             # linear probe
      probe_cs: null          # C grid (null: 1e-2 ... 1e4)
      probe_val_fraction: 0.2 # held-out part of the train split that chooses C
      probe_test_fraction: 0.5 # part of the eval set used for testing when there is no train_data
      seed: 0
      cost: true              # params, GFLOPs, img/s, peak memory
      cost_batch_size: 32
      cost_iters: 10
      rois: true              # the students' pictures (rois.png, kept_keys.png)
      roi_images: 4
      device: null            # null: cuda if available, else cpu
      precision: fp32         # fp32 | bf16 | fp16 autocast for features and throughput
      max_pixels: 64000000    # larger images are skipped and counted before decoding (null: no limit of ours)
      clips: 1                # video students: clips per video (spread over it) ...
      crops: 1                # ... x crops per clip (1: centre, 3: along the longer side); a video's embedding
                              #   is the mean of its views', its cost views x GFLOPs per view
      video_backend: auto     # auto | pyav | torchcodec

Relative paths in ``eval:`` of a run's recipe are tried from the working directory, then from the run folder.
A ``pipe:`` shard URL runs a shell command: it is refused unless the caller opts in (``allow_pipe=True``:
``--allow-pipe`` on the command line), never by a key of the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch

from data.decode import DEFAULT_MAX_PIXELS
from data.schema import load

__all__ = ["EvalConfig", "PRECISIONS", "add_eval_options", "eval_options"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
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
    max_pixels: Union[int, None] = DEFAULT_MAX_PIXELS
    clips: int = 1
    crops: int = 1
    video_backend: str = "auto"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EvalConfig":
        """Build from a mapping; an unknown key is an error naming the nearest valid one."""
        return load(cls, d, "the eval options", typed=False)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ValueError naming the first option whose value cannot work."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"eval precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        at_least = dict(batch_size=1, cost_batch_size=1, cost_iters=1, roi_images=1, num_workers=0,
                        max_samples=1, train_max_samples=1, max_pixels=1, clips=1)
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
        if self.crops not in (1, 3):
            raise ValueError(f"eval crops must be 1 (the centre) or 3 (along the longer side), got {self.crops!r}")
        if self.video_backend not in ("auto", "pyav", "torchcodec"):
            raise ValueError(f"eval video_backend must be auto, pyav or torchcodec, got {self.video_backend!r}")
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


# ----------------------------------------------------------------------------- command lines
def add_eval_options(p: argparse.ArgumentParser) -> None:
    """The options that override a recipe's ``eval:`` keys (shared with ``python -m eval.compare``)."""
    p.add_argument("--data", help="labelled evaluation set: ImageFolder root or labelled shards")
    p.add_argument("--train-data", help="labelled train split for the linear probe (default: split --data)")
    p.add_argument("--classnames", help="zero-shot class names: 'imagenet' or a file with one name per line")
    p.add_argument("--templates", help="zero-shot templates: openai | simple | demo | file with one '{}' template per line")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--max-samples", type=int, help="evaluate on the first N images only")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--cost-batch-size", type=int)
    p.add_argument("--clips", type=int, help="video students: clips per video (default 1)")
    p.add_argument("--crops", type=int, choices=[1, 3], help="video students: crops per clip (default 1)")
    p.add_argument("--no-probe", dest="probe", action="store_const", const=False)
    p.add_argument("--no-cost", dest="cost", action="store_const", const=False)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-pipe", action="store_true",
                   help="let pipe:CMD shard URLs (given here or in the run folder's recipe) run CMD; printed first")


def eval_options(args: argparse.Namespace) -> dict:
    """The ``EvalConfig`` overrides given on the command line (see ``add_eval_options``)."""
    from .zeroshot import name_or_list_file

    options = dict(train_data=args.train_data, classnames=name_or_list_file(args.classnames),
                   templates=name_or_list_file(args.templates), batch_size=args.batch_size,
                   num_workers=args.num_workers, max_samples=args.max_samples, device=args.device,
                   precision=args.precision, cost_batch_size=args.cost_batch_size, probe=args.probe,
                   cost=args.cost, rois=getattr(args, "rois", None), clips=args.clips, crops=args.crops)
    return {k: v for k, v in options.items() if v is not None}
