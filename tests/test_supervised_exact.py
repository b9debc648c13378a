"""Our training with labels is the authors' training step (showlab/sparseformer `imagenet/main.py`).

`tests/fixtures/make_sparseformer_v1_reference.py` ran their `main.py` (their `build_optimizer` with its
no-decay rules, the linearly scaled learning rates, timm's `CosineLRScheduler` stepped with `step_update` after
each step, `clip_grad_norm_`, `LabelSmoothingCrossEntropy(0.1)`, timm's `ModelEmaV2`) for 6 steps of a tiny
SparseFormer on fixed batches; here our run (`bootstrap/run.py`) trains our SparseFormer from the same weights on
the same images, written as labelled shards, and must end with the same weights, the same EMA weights, the same
losses, learning rates and gradient norms.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from labelled import run_here, write_labelled_shards

REFERENCE = FIXTURES / "sparseformer_v1_reference"


def _ours(state: dict) -> dict:
    from students.sparseformer.released import from_imagenet_code

    return from_imagenet_code(state)


@pytest.fixture(scope="module")
def reference():
    steps = load_file(str(REFERENCE / "steps.safetensors"))
    return dict(steps=steps, config=json.loads((REFERENCE / "config.json").read_text()),
                settings=json.loads((REFERENCE / "reference.json").read_text()),
                **{k: _ours(load_file(str(REFERENCE / f"{k}.safetensors"))) for k in ("initial", "final", "ema")})


@pytest.fixture(scope="module")
def our_run(reference, tmp_path_factory):
    """Our run of the authors' tiny config: the batches of their 2 epochs, as shards in the same order."""
    opts = reference["settings"]["opts"]
    tmp = tmp_path_factory.mktemp("exact")
    images, labels = reference["steps"]["images"], reference["steps"]["labels"]
    classes = [f"class {i}" for i in range(reference["settings"]["num_classes"])]
    shards = write_labelled_shards(tmp / "train", images.flatten(0, 1).numpy(), labels.flatten().tolist(), classes)
    save_file(reference["initial"], str(tmp / "initial.safetensors"))
    (tmp / "config.json").write_text(json.dumps(reference["config"]))
    recipe = {
        "student": {"init": str(tmp / "initial.safetensors"), "config": str(tmp / "config.json"),
                    "image_size": opts["DATA.IMG_SIZE"]},
        "objective": {"align": 0, "labels": 1, "label_smoothing": 0.1},
        "data": {"train": str(shards), "batch_size": opts["DATA.BATCH_SIZE"], "num_workers": 0, "shuffle_buffer": 0,
                 "shardshuffle": False, "augment": {"scale": [1, 1], "ratio": [1, 1], "hflip": 0}},
        "optim": {"lr": opts["TRAIN.BASE_LR"], "warmup_lr": opts["TRAIN.WARMUP_LR"], "min_lr": opts["TRAIN.MIN_LR"],
                  "lr_base_batch": 512, "schedule": "timm_cosine", "epochs": opts["TRAIN.EPOCHS"],
                  "warmup_epochs": opts["TRAIN.WARMUP_EPOCHS"], "weight_decay": 0.05,
                  "grad_clip": opts["TRAIN.CLIP_GRAD"], "ema_decay": opts["EMA.DECAY"]},
        "run": {"log_every": 1, "checkpoint_every": 100, "progress": False, "final_report": False},
        "export": {"enabled": False},
    }
    path = tmp / "exact.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp / "run"
    assert run_here(path, out) == 0
    return out


def _max_difference(ours: dict, theirs: dict) -> tuple[float, str]:
    assert ours.keys() == theirs.keys()
    return max(((ours[k] - theirs[k]).abs().max().item(), k) for k in ours)


def test_the_weights_after_six_steps_are_the_authors(reference, our_run):
    ours = load_file(str(our_run / "student.safetensors"))
    moved, _ = _max_difference(reference["final"], reference["initial"])
    assert moved > 5e-3  # the steps moved the weights far beyond the tolerance
    difference, key = _max_difference(ours, reference["final"])
    assert difference < 1e-5, key


def test_the_ema_weights_are_the_authors(reference, our_run):
    ema = load_file(str(our_run / "student_ema.safetensors"))
    assert _max_difference(reference["ema"], reference["final"])[0] > 1e-3  # the EMA lags the weights
    difference, key = _max_difference(ema, reference["ema"])
    assert difference < 1e-5, key


def test_each_step_has_the_authors_loss_learning_rate_and_gradient_norm(reference, our_run):
    records = [json.loads(line) for line in (our_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    steps = reference["steps"]
    assert [r["step"] for r in train] == list(range(1, len(steps["loss"]) + 1))
    torch.testing.assert_close(torch.tensor([r["train/labels"] for r in train], dtype=torch.float64),
                               steps["loss"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["train/grad_norm"] for r in train], dtype=torch.float64),
                               steps["grad_norm"], rtol=1e-5, atol=0)
    # The log line after step k names the rate of the next step; every group runs at the same rate.
    assert (steps["lr"] == steps["lr"][:, :1]).all()
    torch.testing.assert_close(torch.tensor([r["train/lr"] for r in train[:-1]], dtype=torch.float64),
                               steps["lr"][1:, 0], rtol=1e-12, atol=0)


def test_the_schedule_is_timm_s_cosine_as_the_swin_codebase_steps_it(reference):
    """`timm_cosine` against timm's CosineLRScheduler driven as their main.py drives it (step_update(k) after step
    k), over warm-up, cosine and the tail past t_initial; and against the rates their run recorded."""
    from timm.scheduler import CosineLRScheduler

    from bootstrap.stepper import timm_cosine

    lr, warmup_lr, min_lr, warmup, total = 5e-3, 5e-5, 5e-4, 7, 40
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    timm = CosineLRScheduler(optimizer, t_initial=total, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup,
                             cycle_limit=1, t_in_epochs=False)
    for step in range(total + 5):
        assert timm_cosine(step, warmup, total, lr, warmup_lr, min_lr) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-12, abs=0), step
        timm.step_update(step)
    opts = reference["settings"]["opts"]
    scale = opts["DATA.BATCH_SIZE"] / 512
    per_epoch = reference["settings"]["batches_per_epoch"]
    recorded = reference["steps"]["lr"][:, 0].tolist()
    ours = [timm_cosine(k, opts["TRAIN.WARMUP_EPOCHS"] * per_epoch, opts["TRAIN.EPOCHS"] * per_epoch,
                        opts["TRAIN.BASE_LR"] * scale, opts["TRAIN.WARMUP_LR"] * scale, opts["TRAIN.MIN_LR"] * scale)
            for k in range(len(recorded))]
    assert ours == pytest.approx(recorded, rel=1e-12)
    assert recorded[0] == recorded[1] and not math.isclose(recorded[1], recorded[2])  # the one-step lag
