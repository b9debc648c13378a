"""A Sparsifiner's attention cost, counted two ways, and its mask density per block.

Multiply-adds (MACs) per image, the unit of the paper's "MHSA FLOPs" (357.7M for dense DeiT-S):

* executed: what this code runs (in evaluation, on a CPU). The fused attention kernel takes the mask as
  an additive bias, so it forms every logit: QKᵀ and AV are dense (2·H·N²·d); plus the predictor of
  every sparsified block as run: the approximation is a dense [N−P, K] @ [K, N] product, or, with many
  basis rows (`students.sparsifiner.sparse_product`), a sparse one over the top-k coefficients.
* masked: the paper's accounting. QKᵀ and AV only for the kept (query, key) pairs (2·H·d per pair),
  plus the predictor with its top-k coefficients as a sparse combination of basis rows.

The predictor, per block (H heads, N tokens, P prefix rows, d head width, c = d / reduce_c, K basis rows):
proj_c_q and proj_c_k 2·H·N·d·c, k_down H·c·N·K, scores H·(N−P)·c·K, approximation H·(N−P)·K·N (dense)
or H·(N−P)·topk·N (sparse). Blocks with keep rate 1 run no predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .model import sparse_product

__all__ = ["AttentionCost", "attention_cost", "attention_markdown", "measure_attention", "predictor_macs"]


def predictor_macs(heads: int, tokens: int, prefix: int, head_dim: int, reduced_dim: int, num_basis: int,
                   topk: int, sparse_coef: bool) -> int:
    rows = tokens - prefix
    approx = rows * (topk if sparse_coef else num_basis) * tokens
    return heads * (2 * tokens * head_dim * reduced_dim + reduced_dim * tokens * num_basis
                    + rows * reduced_dim * num_basis + approx)


@dataclass
class AttentionCost:
    """Per-image attention MACs of each block and in total; `density` is the fraction of kept pairs."""

    density: list[float] = field(default_factory=list)
    executed_macs: list[int] = field(default_factory=list)
    masked_macs: list[int] = field(default_factory=list)
    dense_macs: int = 0  # QKᵀ and AV of one dense block

    @property
    def executed_total(self) -> int:
        return sum(self.executed_macs)

    @property
    def masked_total(self) -> int:
        return sum(self.masked_macs)

    def rows(self) -> list[dict]:
        """One row per block, for a report table."""
        return [dict(block=i, density=d, executed_gmacs=e / 1e9, masked_gmacs=m / 1e9)
                for i, (d, e, m) in enumerate(zip(self.density, self.executed_macs, self.masked_macs))]

    def to_dict(self) -> dict:
        return dict(blocks=self.rows(), executed_gmacs=self.executed_total / 1e9,
                    masked_gmacs=self.masked_total / 1e9, dense_gmacs=self.dense_macs * len(self.density) / 1e9)


def attention_cost(model, masks: list[Tensor] | None = None) -> AttentionCost:
    """The attention cost of a `Sparsifiner` (or its config) per image, from the config's budgets, or from
    the masks [B, H, N, N] of `forward_details` (the density is then what the images kept, on average)."""
    cfg = getattr(model, "config", model)
    n, p, h, d = cfg.num_tokens, cfg.num_prefix_tokens, cfg.num_heads, cfg.head_dim
    dense = 2 * h * n * n * d
    cost = AttentionCost(dense_macs=dense)
    for i, budget in enumerate(cfg.budgets):
        if masks is not None:
            density = masks[i].float().mean().item()
        else:
            density = (p * n + (n - p) * budget) / (n * n)
        sparse = budget < n
        pred = dict(heads=h, tokens=n, prefix=p, head_dim=d, reduced_dim=cfg.reduced_dim,
                    num_basis=cfg.num_basis, topk=cfg.basis_coef_topk)
        cost.density.append(density)
        run_sparse = sparse_product(cfg.num_basis, cfg.basis_coef_topk)
        cost.executed_macs.append(dense + (predictor_macs(**pred, sparse_coef=run_sparse) if sparse else 0))
        cost.masked_macs.append(round(dense * density) + (predictor_macs(**pred, sparse_coef=True) if sparse else 0))
    return cost


def measure_attention(student, images: Tensor) -> dict:
    """The report's attention section: the cost counted as executed and under the masks of ``images``."""
    import torch

    with torch.no_grad():
        masks = student.forward_details(images, attention=False).attn_masks
    return attention_cost(student, masks).to_dict()


def attention_markdown(a) -> list[str]:
    """The report's attention section as markdown lines."""
    lines = ["## Attention (multiply-adds per image of QKᵀ, AV and the connectivity predictor)", "",
             "| block | kept keys (density) | executed GMACs | under the mask GMACs |", "|---:|---:|---:|---:|"]
    lines += [f"| {b['block']} | {100 * b['density']:.2f}% | {b['executed_gmacs']:.4f} | {b['masked_gmacs']:.4f} |"
              for b in a["blocks"]]
    lines += [f"| all | | {a['executed_gmacs']:.4f} | {a['masked_gmacs']:.4f} |", "",
              f"Dense attention (QKᵀ and AV, no predictor): {a['dense_gmacs']:.4f} GMACs. Executed: what this "
              f"code runs; under the mask: the paper's accounting (only the kept pairs, predictor included).", ""]
    return lines
