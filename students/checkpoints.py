"""Student weights from files, read safely (safetensors, or torch's `weights_only=True`), and loaded strictly
with an error that names every missing, unexpected or mis-shaped key."""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from data.errors import UserError
from teachers.base import weights_load_reason

__all__ = ["CheckpointMismatchError", "load_checkpoint_strict", "load_state_dict_file"]


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or `.pth/.pt/.bin` (safely: weights_only=True).

    A torch checkpoint may hold the weights at the top level or under a `model`
    (or `state_dict`) key; a `module.` prefix left by DDP is removed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device="cpu")
        except SafetensorError as e:  # truncated, or not safetensors at all
            raise CheckpointMismatchError(f"cannot read {path} as a .safetensors file ({e}): is it complete, "
                                          f"and a safetensors file?") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with arbitrary objects, or not a torch file
            raise CheckpointMismatchError(
                f"cannot read {path} as a weights-only torch checkpoint ({type(e).__name__}: "
                f"{weights_load_reason(e)}). "
                f"Re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as .safetensors."
            ) from e
        sd = obj
        if isinstance(obj, Mapping):
            for k in ("model", "state_dict", "model_state_dict"):
                if k in obj and isinstance(obj[k], Mapping):
                    sd = obj[k]
                    break
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointMismatchError(
                f"{path} does not hold a state dict (a mapping of names to tensors, at the top level or "
                f"under 'model'); found {type(sd).__name__}"
            )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_checkpoint_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"):
    """`load_state_dict(strict=True)` with an error that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshaped:

        def block(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"

        raise CheckpointMismatchError(
            f"{source} does not fit {type(model).__name__}"
            + block("missing keys", missing)
            + block("unexpected keys", unexpected)
            + block("mis-shaped keys", misshaped)
            + "\n  Check that the checkpoint was made for this configuration (model name or config JSON)."
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)
    return model
