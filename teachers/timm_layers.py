"""What the timm layers inside a teacher's blocks are, by name (`teachers.base.MLP_LAYERS`, `ACTIVATIONS`), and
their weights in the layout the students load: read alike from timm's `VisionTransformer` blocks
(`teachers.timm_vit`) and its `Eva` blocks (`teachers.eva`)."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from .base import _linear, _ln_affine

__all__ = ["block_weights", "mlp_act", "mlp_hidden_dim", "mlp_layer"]


def mlp_act(act: nn.Module) -> str | None:
    """The activation's name in `ACTIVATIONS`, or None."""
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if isinstance(act, (QuickGELU, OpenClipQuickGELU)):
        return "quick_gelu"
    if isinstance(act, GELUTanh) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    if isinstance(act, GELU) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    if isinstance(act, nn.SiLU):
        return "silu"
    return None


def mlp_layer(mlp: nn.Module) -> str | None:
    """The MLP's kind in `MLP_LAYERS`, or None."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear):
        return "mlp"
    if type(mlp) is SwiGLU:
        return "swiglu"
    if type(mlp) is GluMlp and isinstance(mlp.fc1, nn.Linear):
        return "glu" if mlp.gate_last else "glu_gate_first"
    return None


def mlp_hidden_dim(mlp: nn.Module) -> int:
    """timm's `hidden_features` of an MLP: fc1's width (both halves of a packed GLU; one branch of SwiGLU)."""
    return mlp.fc1_g.out_features if hasattr(mlp, "fc1_g") else mlp.fc1.out_features


def block_weights(module: nn.Module, prefix: str = "", gammas: Mapping[str, Tensor | None] = {}) -> dict[str, Tensor]:
    """Every Linear and LayerNorm inside `module` under `prefix` + its name, a Linear's output rows scaled by
    `gammas[name]` where given (LayerScale folded, exactly), zeros for missing Linear biases and ones/zeros for
    missing LayerNorm affines (the students' blocks always have them)."""
    sd = {}
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            sd.update(_linear(mod, f"{prefix}{name}.", gammas.get(name)))
        elif isinstance(mod, nn.LayerNorm):
            sd.update(_ln_affine(mod, f"{prefix}{name}."))
    return sd
