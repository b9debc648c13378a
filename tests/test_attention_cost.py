"""Sparsifiner attention counted two ways (hand-computed), mask density, and the kept-keys picture."""

import torch

from students.sparsifiner.cost import attention_cost
from students.sparsifiner.pictures import kept_keys_figure
from students import Sparsifiner, SparsifinerConfig

# N = 17 tokens (1 prefix), H = 2 heads of d = 16, c = 8, K = 17 // 2 = 8, top-3 coefficients, budget 5.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, reduce_n_factor=2,
            basis_coef_topk=3, attn_keep_rate=[0.25, 1.0])


def test_counts_match_the_hand_computed_case():
    cost = attention_cost(Sparsifiner(TINY))
    dense = 2 * 2 * 17 * 17 * 16  # QKᵀ and AV: 18496
    assert cost.dense_macs == dense
    # predictor: proj_c_q/k 2*17*16*8 = 4352, k_down 8*17*8 = 1088, scores 16*8*8 = 1024, per head;
    # approximation 16*8*17 = 2176 as run (dense coefficients: K = 8 < 4 * 3), 16*3*17 = 816 with the top-3 only
    assert cost.executed_macs == [dense + 2 * (4352 + 1088 + 1024 + 2176), dense]
    assert cost.density == [(17 + 16 * 5) / 289, 1.0]
    assert cost.masked_macs == [64 * 97 + 2 * (4352 + 1088 + 1024 + 816), dense]
    assert cost.to_dict()["dense_gmacs"] == 2 * dense / 1e9


def test_many_basis_rows_are_executed_as_the_sparse_product():
    cfg = SparsifinerConfig.from_dict({**TINY, "basis_coef_topk": 2})  # K = 8 >= 4 * 2: the CSR product runs
    cost = attention_cost(cfg)
    assert cost.executed_macs[0] - cost.dense_macs == 2 * (4352 + 1088 + 1024 + 16 * 2 * 17)


def test_deit_small_dense_attention_is_the_papers_357_7m():
    cfg = SparsifinerConfig.from_dict(dict(attn_keep_rate=1.0))
    assert attention_cost(cfg).masked_total == 357_663_744  # 2 * 6 heads * 197^2 * 64 * 12 blocks


def test_density_from_masks_and_the_picture(tmp_path):
    model = Sparsifiner(TINY).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        d = model.forward_details(images)
    cost = attention_cost(model, d.attn_masks)
    assert abs(cost.density[0] - 97 / 289) < 1e-6 and cost.density[1] == 1.0
    path = kept_keys_figure(images, d.attn_masks, tmp_path / "kept.png", block=0, queries=[0, 5])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
