"""SparseFormer against the golden fixtures computed by the authors' code, plus config and loading."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN
from students import (
    CheckpointMismatchError,
    ConfigError,
    MediaSparseFormer,
    SparseFormer,
    SparseFormerConfig,
    create_model,
    get_config,
    get_pretrained_cfg,
    list_models,
    load_student,
)

CASES = ["tiny_v1", "tiny_btsp_clip", "tiny_btsp_augreg", "tiny_media_btsp_clip"]
RELEASED = json.loads((GOLDEN / "released_configs.json").read_text())


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    if theirs.norm() == 0:  # a zero reference: ours must be zero too
        return ours.norm().item()
    err = ((ours - theirs).norm() / theirs.norm()).item()
    assert err == err, "NaN never passes"
    return err


def load_case(case):
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    cls = {"SparseFormer": SparseFormer, "MediaSparseFormer": MediaSparseFormer}[meta["model_class"]]
    model = cls.from_config(meta["config"], **meta["extra_kwargs"])
    sd = {k: v.float() for k, v in load_file(GOLDEN / f"{case}.state_dict.safetensors").items()}
    model.load_state_dict(sd, strict=True)
    io = {k: v.float() for k, v in load_file(GOLDEN / f"{case}.io.safetensors").items()}
    return meta, model, io


@pytest.mark.parametrize("case", CASES)
def test_eval_output_rois_and_tokens_match_golden(case):
    meta, model, io = load_case(case)
    model.eval()
    assert list(io["input"].shape) == meta["input_shape"]
    with torch.no_grad():
        out = model.forward_details(io["input"])
    assert rel_err(out.output, io["output"]) < 1e-5
    assert rel_err(out.roi, io["token_roi"]) < 1e-5
    assert rel_err(out.tokens, io["token_embedding"]) < 1e-5
    # forward() computes the same output; with a class-token head its last block updates the
    # class token alone, so only rounding may differ from forward_details().output.
    with torch.no_grad():
        fast = model(io["input"])
    assert rel_err(fast, io["output"]) < 1e-5
    assert rel_err(fast, out.output) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_train_mode_gradients_match_golden(case):
    _, model, io = load_case(case)
    model.train()
    x = io["input"].clone().requires_grad_(True)
    model(x).square().sum().backward()
    assert rel_err(x.grad, io["grad_input"]) < 1e-5
    params = dict(model.named_parameters())
    grads = {k[len("grad."):]: v for k, v in io.items() if k.startswith("grad.")}
    assert len(grads) > 30
    for name, ref in grads.items():
        assert rel_err(params[name].grad, ref) < 1e-5, name


@pytest.mark.parametrize("case,src", [("tiny_v1.inflated_r3", "tiny_v1"), ("tiny_btsp_clip.inflated_r2", "tiny_btsp_clip")])
def test_video_inflation_matches_golden(case, src):
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    sd2d = {k: v.float() for k, v in load_file(GOLDEN / f"{src}.state_dict.safetensors").items()}
    model = MediaSparseFormer(meta["config"], replicates=meta["replicates"])
    model.load_2d_state_dict(sd2d)
    ref = {k: v.float() for k, v in load_file(GOLDEN / f"{case}.state_dict.safetensors").items()}
    ours = model.state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
    io = load_file(GOLDEN / f"{case}.io.safetensors")
    model.eval()
    with torch.no_grad():
        out = model(io["input"].float())
    assert rel_err(out, io["output"].float()) < 1e-5


def test_video_tokens_are_replicated_blockwise():
    cfg = json.loads((GOLDEN / "tiny_v1.json").read_text())["config"]
    model = MediaSparseFormer(cfg, replicates=3)
    n = cfg["num_latent_tokens"]
    assert model.num_tokens == 3 * n
    roi = model.initial_roi.weight
    # copy k of token i spans time [k/3, (k+1)/3] with the image RoI in x, y
    for k in range(3):
        block = roi[k * n : (k + 1) * n]
        torch.testing.assert_close(block[:, [0, 1, 3, 4]], roi[:n][:, [0, 1, 3, 4]])
        torch.testing.assert_close(block[:, 2], torch.full((n,), k / 3))
        torch.testing.assert_close(block[:, 5], torch.full((n,), (k + 1) / 3))


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize("case", CASES)
def test_config_round_trips_to_golden_json(case):
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    cfg = SparseFormerConfig.from_dict(meta["config"])
    assert cfg.to_dict() == meta["config"]
    assert SparseFormerConfig.from_json(cfg.to_json()) == cfg


def test_missing_compatible_switches_take_btsp_defaults():
    meta = json.loads((GOLDEN / "tiny_btsp_clip.json").read_text())
    d = dict(meta["config"], compatible_config={"pg_inner_dim": 32})
    cc = SparseFormerConfig.from_dict(d).compatible_config
    assert (cc.type_num_attn_heads, cc.type_op_adjust, cc.restrict_grad_norm, cc.transition_ln) == (2, 2, False, False)
    assert (cc.mixing_bias, cc.ln_eps, cc.use_stage_embedding, cc.clip_quick_gelu) == (False, 1e-5, True, False)
    g = cc.grid_sample_config
    assert (g.mode, g.padding_mode, g.align_corners) == ("bilinear", "border", False)
    assert SparseFormerConfig.from_dict(dict(meta["config"], compatible_config={})).compatible_config.pg_inner_dim == 0.25


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configurations_have_exact_keys_shapes_and_counts(name):
    ref = RELEASED[name]
    cfg = get_config(name)
    assert cfg.to_dict() == ref["config"]
    with torch.device("meta"):
        model = SparseFormer(cfg)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(ref["state_dict"])  # same keys, same order
    assert shapes == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]


def test_list_models_and_pretrained_cfgs():
    assert sorted(list_models()) == sorted(RELEASED)
    clip = get_pretrained_cfg("sparseformer_btsp_openai_clip_large")
    assert clip.mean == (0.48145466, 0.4578275, 0.40821073) and clip.input_size == (3, 224, 224)
    assert get_pretrained_cfg("sparseformer_v1_tiny").std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="sparseformer_v1_tiny"):
        create_model("sparseformer_v1_tiyn")


# ------------------------------------------------------------ checkpoints
def _tiny_cfg():
    return json.loads((GOLDEN / "tiny_btsp_clip.json").read_text())["config"]


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_model_key"])
def test_load_student_from_each_checkpoint_format(tmp_path, fmt):
    src = SparseFormer(_tiny_cfg()).eval()
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(src.config.to_json())
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(src.state_dict(), path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": src.state_dict(), "epoch": 3} if fmt == "pth_model_key" else src.state_dict(), path)
    loaded = load_student(cfg_path, path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))


def test_create_model_loads_a_released_name_strictly(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_model("sparseformer_v1_tiny").state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    sd["initial_roi.weight"] = torch.rand(shapes["initial_roi.weight"])
    path = tmp_path / "v1_tiny.safetensors"
    save_file(sd, path)
    model = create_model("sparseformer_v1_tiny", pretrained=path)
    assert torch.equal(model.initial_roi.weight, sd["initial_roi.weight"])
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_checkpoint_that_does_not_fit_lists_missing_unexpected_and_misshaped(tmp_path):
    sd = SparseFormer(_tiny_cfg()).state_dict()
    del sd["norm.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["initial_roi.weight"] = torch.zeros(5, 4)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(SparseFormerConfig.from_dict(_tiny_cfg()).to_json())
    with pytest.raises(CheckpointMismatchError) as e:
        load_student(cfg_path, path)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "norm.weight" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "mis-shaped keys (1)" in msg and "initial_roi.weight: checkpoint (5, 4) vs model (8, 4)" in msg


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(SparseFormerConfig.from_dict(_tiny_cfg()).to_json())
    with pytest.raises(CheckpointMismatchError, match="weights-only"):
        load_student(cfg_path, path)


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change,match",
    [
        ({"ops_list": [["SAMPLING_M", "PE_INJECT", "ATTN", "MLP", "ROI_ADJUST"]] + [["SAMPLING_M", "PE_INJECT"]] + [["ATTN", "MLP"]] * 3},
         "unknown op 'ROI_ADJUST'.*ROI_ADJ"),
        ({"width_configs": [64, 200, 200, 200, 200]}, r"width_configs\[2\] = 200 cannot be split into 3 attention heads"),
        ({"num_latent_tokens": 0}, "num_latent_tokens must be a positive integer"),
        ({"num_sampling_points": 0}, "num_sampling_points must be a positive integer"),
        ({"head_opp": "cls"}, "unknown key 'head_opp'.*head_op"),
        ({"repeats": [2, 1]}, "one entry per unit"),
        ({"compatible_config": {"ln_epsilon": 1e-5}}, "unknown key 'ln_epsilon'.*ln_eps"),
    ],
)
def test_bad_configs_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        SparseFormerConfig.from_dict({**_tiny_cfg(), **change})


@pytest.mark.parametrize(
    "shape,match",
    [((2, 1, 32, 32), "3 image channels"), ((3, 32, 32), r"\[B, 3, H, W\]"), ((2, 3, 5, 32), "smaller than")],
)
def test_bad_images_name_the_shape(shape, match):
    model = SparseFormer(_tiny_cfg())
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_any_resolution_works_and_trace_has_every_stage():
    model = SparseFormer(_tiny_cfg()).eval()
    with torch.no_grad():
        out = model.forward_details(torch.randn(2, 3, 48, 80))
    # focusing unit: 2 repetitions (one sampling each), then one sampling unit
    assert len(out.points) == 3 and len(out.rois) == 4
    assert out.points[0].shape == (2, 8, 9, 2) and out.rois[-1].shape == (2, 8, 4)
    assert out.tokens.shape == (2, 9, 128)  # 8 latent tokens + cls
    assert out.output.shape == (2, 16) and out.pre_logits.shape == (2, 128)


def test_fresh_initialisation_follows_the_design_note():
    model = SparseFormer({**_tiny_cfg(), "num_latent_tokens": 10})
    roi = model.initial_roi.weight
    # first 3x3 tokens on a grid of half-size boxes, the rest the whole image
    torch.testing.assert_close(roi[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(roi[1 * 3 + 2], torch.tensor([0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(roi[9], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    unit = model.layers[0]
    assert torch.count_nonzero(unit.roi_offset_module[1].weight) == 0
    assert torch.count_nonzero(unit.roi_adjust_module[-1].weight) == 0
    assert torch.count_nonzero(unit.adaptive_mixing.parameter_generator[-1].weight) == 0
    # 9 points: a centred 3x3 grid in (-0.5, 0.5)
    pts = unit.roi_offset_bias.view(9, 2)
    torch.testing.assert_close(pts[:3, 0], torch.tensor([-1 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(pts[::3, 1], torch.tensor([-1 / 3, 0.0, 1 / 3]))
    # a fresh model computes finite outputs and its RoIs start where initialised
    with torch.no_grad():
        out = model.forward_details(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(out.output).all()
    torch.testing.assert_close(out.rois[0][0], roi)
