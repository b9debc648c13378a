"""Sparsifiner against the authors' code (golden fixtures), its phases, and its errors."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from students.sparsifiner.training import attention_reconstruction_loss
from conftest import GOLDEN
from students import ConfigError, Sparsifiner, SparsifinerConfig

CASES = ["sparsifiner_tiny", "sparsifiner_tiny_shared"]
FIX = GOLDEN / "sparsifiner"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, basis_coef_topk=2)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _case(name):
    meta = json.loads((FIX / f"{name}.json").read_text())
    model = Sparsifiner(meta["config"])
    model.load_state_dict(load_file(FIX / f"{name}.state_dict.safetensors"), strict=True)
    return meta, model, load_file(FIX / f"{name}.io.safetensors")


@pytest.mark.parametrize("name", CASES)
def test_eval_matches_the_authors_code(name):
    meta, model, io = _case(name)
    assert model.budgets == meta["attn_budget"] and model.num_tokens == meta["num_tokens"]
    model.eval()
    with torch.no_grad():
        d = model.forward_details(io["input"])
        assert rel(model(io["input"]), io["output"]) < 1e-5
    assert rel(d.output, io["output"]) < 1e-5
    assert rel(d.tokens[:, 1:], io["patch_tokens"]) < 1e-5
    assert rel(d.patch_tokens, io["patch_tokens"]) < 1e-5
    for i in range(len(model.blocks)):
        assert rel(d.approx_attn[i], io[f"approx_attn.{i}"]) < 1e-5
        assert d.attn_masks[i].dtype == torch.bool
        assert torch.equal(d.attn_masks[i], io[f"attn_mask.{i}"].bool())
        assert rel(d.attn[i], io[f"attn.{i}"]) < 1e-5
        assert (d.attn_masks[i][:, :, 1:].sum(-1) == meta["attn_budget"][i]).all()


@pytest.mark.parametrize("name", CASES)
def test_reconstruct_phase_loss_and_predictor_gradients_match(name):
    meta, model, io = _case(name)
    model.train().set_phase("reconstruct")
    d = model.forward_details(io["input"], attention=False)
    assert rel(d.output, io["reconstruct.output"]) < 1e-5
    depth = len(model.blocks)
    for i in range(depth):
        assert rel(d.approx_attn[i], io[f"reconstruct.approx_attn.{i}"]) < 1e-5
    loss = attention_reconstruction_loss(d.approx_attn, [io[f"dense_attn.{i}"] for i in range(depth)])
    assert rel(loss.reshape(1), io["reconstruct.loss"]) < 1e-5
    loss.backward()
    expected = {k.removeprefix("reconstruct.grad."): v for k, v in io.items() if k.startswith("reconstruct.grad.")}
    grads = {n: p.grad for n, p in model.named_parameters() if "mask_predictor" in n}
    assert set(grads) == set(expected)
    for n, g in grads.items():
        assert rel(g, expected[n]) < 1e-4, n


@pytest.mark.parametrize("name", CASES)
def test_sparse_phase_gradients_match_and_none_reach_the_predictor(name):
    meta, model, io = _case(name)
    model.train().set_phase("sparse")
    d = model.forward_details(io["input"], maps=False)  # the training path: fused kernel, nothing kept
    assert d.approx_attn == [] and d.attn_masks == [] and d.attn == []
    assert rel(d.output, io["sparse.output"]) < 1e-5
    ((d.output * io["sparse.w_output"]).sum() + (d.patch_tokens * io["sparse.w_patch_tokens"]).sum()).backward()
    expected = {k.removeprefix("sparse.grad."): v for k, v in io.items() if k.startswith("sparse.grad.")}
    for n, p in model.named_parameters():
        if n in expected:
            assert rel(p.grad, expected[n]) < 1e-4, n
        else:
            assert "mask_predictor" in n and (p.grad is None or not p.grad.any()), n


def test_forward_equals_forward_details_and_the_dense_path_in_training():
    _, model, io = _case("sparsifiner_tiny")
    model.train().set_phase("sparse")  # no dropout: train and eval compute the same function
    with torch.no_grad():
        out = model(io["input"])
        fused = model.forward_details(io["input"], attention=False)
        model.eval()
        assert torch.allclose(out, model(io["input"]), atol=1e-6)
    assert torch.allclose(fused.output, io["output"], atol=1e-5)


def test_keep_rate_one_is_its_vit_exactly():
    cfg = SparsifinerConfig.from_dict({**TINY, "attn_keep_rate": 1.0})
    model = Sparsifiner(cfg).eval()
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=5).eval()
    vit.load_state_dict({k: v for k, v in model.state_dict().items() if "mask_predictor" not in k}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5)
        d = model.forward_details(x)
        assert all(m.all() for m in d.attn_masks)
        assert torch.allclose(d.tokens, vit.forward_features(x), atol=1e-5)


def test_forward_tokens_layers_and_class_token():
    model = Sparsifiner({**TINY, "depth": 3, "reg_tokens": 2, "no_embed_class": True}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        d = model.forward_details(x)
        assert torch.allclose(model.forward_tokens(x), d.tokens, atol=1e-6)
        assert model.forward_tokens(x, class_token=False).shape == (2, 16, 32)
        # hidden-state indexing (as LLaVA's): 0 enters block 0, k is after k blocks, -2 after the penultimate
        assert torch.allclose(model.forward_tokens(x, layer=-2), model.forward_tokens(x, layer=2))
        assert torch.equal(model.forward_tokens(x, layer=0), model._embed(x))
        assert not torch.allclose(model.forward_tokens(x, layer=0), model.forward_tokens(x, layer=1))
        states = model.forward_hidden_states(x)
        assert len(states) == 4 and all(torch.equal(states[k], model.forward_tokens(x, layer=k)) for k in range(4))
        assert torch.allclose(model.norm(states[-1]), d.tokens, atol=1e-6)
        # registers: their query rows are dense like the class token's, the approximation skips them
        assert d.approx_attn[0].shape == (2, 2, 16, 19) and d.attn_masks[0][:, :, :3].all()
    for bad in (4, -5, 1.0):
        with pytest.raises(IndexError, match=r"3 blocks, so layer must be an integer in \[-4, 3\]"):
            model.forward_tokens(x, layer=bad)


def test_config_round_trips_and_tells_its_family():
    meta = json.loads((FIX / "sparsifiner_tiny_shared.json").read_text())
    cfg = SparsifinerConfig.from_dict(meta["config"])
    assert SparsifinerConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["family"] == "sparsifiner"
    assert cfg.budgets == meta["attn_budget"] and cfg.keep_rates == [0.5, 0.25, 0.1]


@pytest.mark.parametrize("change, message", [
    ({"attn_keep_rat": 0.3}, "Did you mean 'attn_keep_rate'"),
    ({"attn_keep_rate": 0.0}, r"attn_keep_rate = 0.0 is outside \(0, 1\]"),
    ({"attn_keep_rate": 1.5}, r"outside \(0, 1\]"),
    ({"attn_keep_rate": [0.5, 2.0]}, r"attn_keep_rate\[1\]"),
    ({"attn_keep_rate": [0.5, 0.5, 0.5]}, "has 3 rates for 2 blocks"),
    ({"reduce_c_factor": 32}, r"reduce_c_factor=32 .* valid range: 1..16"),
    ({"reduce_n_factor": 100}, r"reduce_n_factor=100 .* valid range: 1..17"),
    ({"basis_coef_topk": 3}, r"basis_coef_topk=3 .* valid range: 1..2"),
])
def test_bad_configs_name_the_key_and_the_valid_range(change, message):
    with pytest.raises(ConfigError, match=message):
        SparsifinerConfig.from_dict({**TINY, **change})


def test_bad_images_and_phases_are_refused_clearly():
    model = Sparsifiner(TINY)
    with pytest.raises(ValueError, match="images \\[B, 3, 32, 32\\].*resolution to 32x32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="reconstruct and sparse"):
        model.set_phase("dense")


def test_many_basis_rows_take_the_sparse_product_with_the_same_result():
    from students.sparsifiner.model import MaskPredictor

    predictor = MaskPredictor(16, 65, 8, 32, share_inout_proj=False)  # K = 32 >= 4 * top-4: CSR product
    q, k = torch.randn(2, 3, 65, 16), torch.randn(2, 3, 65, 16)
    with torch.no_grad():
        fast = predictor.approx(q, k, 1, 0.02, 4)
    reference = predictor.approx(q, k, 1, 0.02, 4).detach()  # with grad enabled: the dense product
    assert fast.shape == (2, 3, 64, 65) and torch.allclose(fast, reference, atol=1e-6)
