"""The bootstrapping run end to end on a tiny teacher and the generated demo data.

Runs are small (a 3-block random CLIP at 32 px, a 5-token student, 8 steps of 6 images) so
that the whole file takes a minute or two on two busy CPU cores. Single-process runs go
through `bootstrap.run.main` in this process (accelerate's state is reset in between); the
two-process run and the killed run are subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bootstrap.checkpoint import KILL_ENV, list_checkpoints, read_state
from bootstrap.stepper import NONFINITE_ENV

ROOT = Path(__file__).resolve().parents[1]

TINY_RECIPE = {
    "teacher": {
        "kind": "openclip", "model": "tiny-clip", "pretrained": None,
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
    },
    "student": {"tokens": 5, "focus_width": 32, "conv_dim": 16, "num_points": 4, "pg_inner_dim": 16,
                "focus_repeats": 2},
    "data": {"batch_size": 6, "num_workers": 0, "shuffle_buffer": 10, "heldout_samples": 12,
             "augment": {"scale": [0.5, 1.0], "hflip": 0.5}},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "steps": 8},
    "run": {"log_every": 2, "eval_every": 4, "checkpoint_every": 4, "keep_checkpoints": 2, "progress": False,
            "final_report": False},
    "export": {"enabled": False},
}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from data.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    # 60 train images: 10 batches of 6 per epoch on one rank, 5 per rank on two.
    make_demo_dataset(out, num=72, size=32, val_fraction=1 / 6, shard_size=20)
    return out


@pytest.fixture(scope="module")
def recipe_file(demo_data, tmp_path_factory) -> Path:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["data"]["train"] = str(demo_data / "train")
    recipe["data"]["val"] = str(demo_data / "val")
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_here(recipe: Path, out: Path, *overrides: str) -> int:
    """`python bootstrap/run.py RECIPE ...` in this process, with accelerate's singletons reset."""
    from accelerate.state import AcceleratorState, GradientState

    from bootstrap.run import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return main([str(recipe), f"run.output_dir={out}", *overrides])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def run_tiny_teacher(tmp_path: Path, teacher: dict, student: dict, image_size: int = 32) -> Path:
    """`run_here` on TINY_RECIPE with another teacher spec and student options: 4 steps on 24 demo images of
    `image_size` px, exporting at the end. Returns the run folder."""
    from data.demo import make_demo_dataset

    data = tmp_path / "data"
    make_demo_dataset(data, num=24, size=image_size, val_fraction=1 / 4, shard_size=12)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["teacher"] = teacher
    recipe["student"] = {**recipe["student"], **student}
    recipe["data"].update(train=str(data / "train"), val=str(data / "val"), heldout_samples=6)
    recipe["optim"]["steps"] = 4
    recipe["export"] = {"enabled": True}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert run_here(path, out) == 0
    return out


def run_subprocess(args: list[str], env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # The thread count of this process: bit-equal comparisons with in-process runs need the same kernels.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight_run(recipe_file, tmp_path_factory) -> Path:
    """8 steps without interruption: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_here(recipe_file, out) == 0
    return out


# ----------------------------------------------------------------------------- outputs


def test_run_writes_its_outputs(straight_run):
    from students import load_student
    from teachers import create_teacher

    names = {p.name for p in straight_run.iterdir()}
    for name in ("student.safetensors", "student_config.json", "recipe.yaml", "pretrained_cfg.json",
                 "metrics.jsonl", "tb", "checkpoints", "alignment.png", "train_summary.json"):
        assert name in names, name
    # The last keep_checkpoints=2 complete checkpoints (steps 4 and 8), nothing half-written.
    assert [s for s, _ in list_checkpoints(straight_run / "checkpoints")] == [4, 8]
    assert not list((straight_run / "checkpoints").glob(".tmp-*"))
    state = read_state(straight_run / "checkpoints" / "step-0000008")
    assert state["step"] == 8 and state["samples_seen"] == 48
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 8)  # 10 batches per epoch

    records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for key in ("train/cosine", "train/lr", "train/img_per_s", "train/data_wait_frac", "train/grad_norm"):
        assert all(key in r for r in train), key
    held = [r for r in records if "heldout/cosine" in r]
    assert [r["step"] for r in held] == [0, 4, 8]
    assert held[-1]["heldout/cosine"] > held[0]["heldout/cosine"]  # it learns
    assert all(r["heldout/num_images"] == 12 for r in held)

    # The saved student is the trained one, loadable on its own; recipe.yaml rebuilds its teacher.
    recipe = yaml.safe_load((straight_run / "recipe.yaml").read_text())
    assert Path(recipe["teacher"]["pretrained"]).is_file()  # the random teacher's weights, saved
    teacher = create_teacher(recipe["teacher"])
    student = load_student(straight_run / "student_config.json", straight_run / "student.safetensors").eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = student(images)
    assert out.shape == (3, 32)
    cos_teacher = torch.nn.functional.cosine_similarity(out, teacher.embed(images)).mean()
    assert cos_teacher > 0.3
    pcfg = json.loads((straight_run / "pretrained_cfg.json").read_text())
    assert pcfg["input_size"] == [3, 32, 32]
    summary = json.loads((straight_run / "train_summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 8 and summary["nonfinite_total"] == 0
    assert summary["heldout_end"]["cosine"] == pytest.approx(held[-1]["heldout/cosine"])


def test_frozen_parameters_stay_frozen(straight_run, recipe_file):
    """The last third of the inherited blocks and the head are the teacher's, untouched."""
    from teachers import create_teacher

    recipe = yaml.safe_load((straight_run / "recipe.yaml").read_text())
    teacher = create_teacher(recipe["teacher"])
    w = weights(straight_run)
    head = teacher.head_state_dict()["weight"]
    assert torch.equal(w["proj.weight"], head)
    assert torch.equal(w["norm.weight"], teacher.norm_state_dict()["weight"])


# ----------------------------------------------------------------------------- resume


def test_stop_and_resume_gives_the_same_weights(straight_run, recipe_file, tmp_path):
    out = tmp_path / "run"
    assert run_here(recipe_file, out, "run.stop_after=3") == 0
    assert not (out / "student.safetensors").exists()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    assert run_here(recipe_file, out) == 0  # run.resume=auto
    assert_same_weights(weights(out), weights(straight_run))
    # The metrics of the resumed run continue where the checkpoint left them.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [2, 4, 6, 8]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("step-0000003")


def test_killed_while_writing_a_checkpoint_resumes_from_the_last_good_one(straight_run, recipe_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "bootstrap/run.py", str(recipe_file), f"run.output_dir={out}", "run.checkpoint_every=2"]
    killed = run_subprocess(cmd, {KILL_ENV: "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    assert (ckpts / ".tmp-step-0000004").is_dir()  # the half-written one, never taken for a checkpoint
    assert not (ckpts / "step-0000004").exists()

    resumed = run_subprocess(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-0000002" in resumed.stdout
    assert not list(ckpts.glob(".tmp-*"))
    assert_same_weights(weights(out), weights(straight_run))


def test_resume_from_a_named_checkpoint_and_bad_names(straight_run, recipe_file, tmp_path):
    from bootstrap.checkpoint import resolve_resume

    step4 = straight_run / "checkpoints" / "step-0000004"
    assert resolve_resume(str(step4), tmp_path) == step4
    assert resolve_resume(str(straight_run), tmp_path) == straight_run / "checkpoints" / "step-0000008"
    assert resolve_resume("none", straight_run / "checkpoints") is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    broken = tmp_path / "step-0000009"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_resume(str(broken), tmp_path)
    # A run resumed from step 4 of another run's checkpoints ends where that run ended.
    out = tmp_path / "run"
    assert run_here(recipe_file, out, f"run.resume={step4}") == 0
    assert_same_weights(weights(out), weights(straight_run))


# ----------------------------------------------------------------------------- the demo


def test_the_demo_trains_its_teacher_once_and_bootstraps_from_it(tmp_path, capsys):
    """recipes/demo.yaml's path in miniature: data and teacher are made, cached, then reused."""
    cache = tmp_path / "cache"
    tiny = ["demo.num_images=48", "demo.image_size=32", f"demo.cache_dir={cache}",
            "demo.teacher={width: 32, layers: 2, heads: 2, patch_size: 8, embed_dim: 16, text_width: 16, "
            "text_layers: 1, text_heads: 1, steps: 6, batch_size: 8, consistency_weight: 1.0, consistency_images: 4, "
            "min_zero_shot: 0}",
            "student={tokens: 5, drop_blocks: 1, finetune_blocks: 1, focus_width: 16, focus_repeats: 1, "
            "num_points: 4, pg_inner_dim: 16, conv_dim: 8}",
            "data.batch_size=8", "data.num_workers=0", "data.heldout_samples=8", "data.augment={scale: [0.8, 1.0]}",
            "optim.steps=2", "optim.warmup_steps=1", "run.progress=false", "run.final_report=false",
            "export.enabled=false", "run.eval_every=2"]
    recipe = ROOT / "recipes" / "demo.yaml"
    assert run_here(recipe, tmp_path / "a", *tiny) == 0
    first = capsys.readouterr().out
    assert "training the demo teacher" in first and "demo teacher trained: 6 steps" in first
    assert "teacher: the demo teacher " in first and "(6 steps; zero-shot top-1" in first
    (teacher_dir,) = [p for p in (cache / "demo-teacher").iterdir() if p.is_dir()]
    info = json.loads((teacher_dir / "demo_teacher.json").read_text())
    assert info["steps"] == 6 and info["finished"] and info["settings"]["consistency_weight"] == 1.0
    assert 0.0 <= info["zero_shot_top1_val"] <= 1.0 and info["val_images"] == 8
    recipe_a = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert recipe_a["teacher"]["pretrained"] == str(teacher_dir / "open_clip_model.safetensors")
    assert recipe_a["data"]["train"] == str(Path(info["data"]) / "train")

    # A second run finds both in the cache and learns from the very same teacher.
    assert run_here(recipe, tmp_path / "b", *tiny) == 0
    second = capsys.readouterr().out
    assert "training the demo teacher" not in second and "making the demo dataset" not in second
    assert yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())["teacher"] == recipe_a["teacher"]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))

    # Another teacher setting is another cached teacher, never a stale one.
    assert run_here(recipe, tmp_path / "c", *tiny, "demo.teacher.consistency_weight=0.0") == 0
    assert "training the demo teacher" in capsys.readouterr().out
    assert len([p for p in (cache / "demo-teacher").iterdir() if p.is_dir()]) == 2


def test_a_new_rendering_of_the_demo_data_is_new_data_and_a_new_teacher(tmp_path, monkeypatch):
    """The cache keys on data.demo's DEMO_DATA_VERSION: after an upgrade that draws the images
    differently, the demo never reuses the old images or a teacher trained on them."""
    import data.demo
    from bootstrap.config import load_recipe
    from bootstrap.demo_teacher import _teacher_key, ensure_demo_data

    demo = load_recipe(ROOT / "recipes" / "demo.yaml", ["demo.num_images=12", f"demo.cache_dir={tmp_path}"]).demo
    old_folder, old_key = ensure_demo_data(demo, verbose=False), _teacher_key(demo)
    monkeypatch.setattr(data.demo, "DEMO_DATA_VERSION", data.demo.DEMO_DATA_VERSION + 1)
    new_folder = ensure_demo_data(demo, verbose=False)
    assert new_folder != old_folder and _teacher_key(demo) != old_key
    assert json.loads((new_folder / "demo.json").read_text())["version"] == data.demo.DEMO_DATA_VERSION
    assert ensure_demo_data(demo, verbose=False) == new_folder  # and it is cached in turn


def test_demo_teacher_views_share_their_flips():
    from bootstrap.demo_teacher import _augment

    images = torch.rand(16, 3, 32, 32)
    first, flip = _augment(images, torch.Generator().manual_seed(0))
    second, flip2 = _augment(images, torch.Generator().manual_seed(1), flip=flip)
    assert torch.equal(flip, flip2) and 0 < flip.sum() < 16
    assert not torch.equal(first, second)  # other shifts
    # The same generator without flips draws the same shifts; flipping those where `flip` says gives `first`.
    same_shift, _ = _augment(images, torch.Generator().manual_seed(0), flip=torch.zeros_like(flip))
    assert torch.equal(torch.where(flip, same_shift.flip(3), same_shift), first)


TINY_TEACHER = ("demo.teacher={width: 32, layers: 1, heads: 2, patch_size: 8, embed_dim: 16, text_width: 16, "
                "text_layers: 1, text_heads: 1, steps: 12, batch_size: 8, consistency_images: 4, min_zero_shot: 0}")


def test_the_demo_teacher_trains_by_its_steps_whatever_the_clock(tmp_path, monkeypatch):
    """A busy machine caches the same teacher as a quiet one: no time cap ends the schedule early."""
    import bootstrap.demo_teacher as dt
    from bootstrap.config import load_recipe

    demo = load_recipe(ROOT / "recipes" / "demo.yaml", ["demo.num_images=24", "demo.image_size=32",
                                                        f"demo.cache_dir={tmp_path}", TINY_TEACHER]).demo
    data_dir = dt.ensure_demo_data(demo, verbose=False)
    (tmp_path / "quiet").mkdir()
    quiet = dt.train_demo_teacher(demo, data_dir, tmp_path / "quiet", verbose=False)
    clock = iter(range(0, 10**9, 3600))  # a very busy machine: every look at the clock, an hour later
    monkeypatch.setattr(dt.time, "time", lambda: float(next(clock)))
    (tmp_path / "busy").mkdir()
    busy = dt.train_demo_teacher(demo, data_dir, tmp_path / "busy", verbose=False)
    assert quiet["steps"] == busy["steps"] == 12 and busy["finished"]
    assert_same_weights(load_file(str(tmp_path / "quiet" / dt.WEIGHTS)), load_file(str(tmp_path / "busy" / dt.WEIGHTS)))


def test_a_demo_teacher_below_the_quality_floor_is_neither_cached_nor_used(tmp_path, capsys):
    """The near-random teacher a cut-short training gave is refused in one line, kept aside, never cached."""
    recipe = ROOT / "recipes" / "demo.yaml"
    tiny = ["demo.num_images=24", "demo.image_size=32", f"demo.cache_dir={tmp_path / 'cache'}",
            TINY_TEACHER.replace("min_zero_shot: 0", "min_zero_shot: 0.99"), "optim.steps=1", "optim.warmup_steps=0"]
    assert run_here(recipe, tmp_path / "run", *tiny) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the demo teacher in ") and err.count("\n") == 1, err
    assert "below demo.teacher.min_zero_shot=99%" in err and "not cached" in err
    teachers = tmp_path / "cache" / "demo-teacher"
    assert [p.suffix for p in teachers.iterdir() if p.is_dir()] == [".below-floor"]
    assert not (tmp_path / "run" / "student.safetensors").exists()

    # A cached teacher whose record says it is below the floor (e.g. from elsewhere) is refused too.
    import bootstrap.demo_teacher as dt
    from bootstrap.config import load_recipe

    demo = load_recipe(recipe, tiny[:3] + [TINY_TEACHER]).demo
    folder = dt.ensure_demo_teacher(demo, dt.ensure_demo_data(demo, verbose=False), verbose=False)
    info = json.loads((folder / dt.INFO_JSON).read_text())
    floor = load_recipe(recipe, tiny[:3] + [TINY_TEACHER.replace("min_zero_shot: 0", "min_zero_shot: 0.5")]).demo
    (folder.parent / dt._digest(dt._teacher_key(floor))).mkdir()
    (folder.parent / dt._digest(dt._teacher_key(floor)) / dt.INFO_JSON).write_text(
        json.dumps({**info, "zero_shot_top1_val": 0.128}))
    with pytest.raises(dt.DemoTeacherError, match=r"has 12.8% zero-shot top-1 .* below demo.teacher.min_zero_shot=50%"):
        dt.ensure_demo_teacher(floor, dt.ensure_demo_data(floor, verbose=False), verbose=False)


# ----------------------------------------------------------------------------- CPU threads


def test_cpu_threads_share_the_cores_unless_the_user_says_otherwise():
    from bootstrap.launch import cpu_threads

    launcher = {"ACCELERATE_MIXED_PRECISION": "no"}  # what `accelerate launch` puts in the environment
    assert cpu_threads(3, local_processes=2, env={}, cores=8) == 3  # a number is used as it is
    assert cpu_threads("auto", local_processes=1, env={}, cores=8) == 8
    assert cpu_threads("auto", local_processes=2, env={}, cores=8) == 4
    assert cpu_threads("auto", local_processes=4, env={}, cores=2) == 1
    assert cpu_threads("auto", 1, env={"OMP_NUM_THREADS": "3"}, cores=8) == 3  # the user's setting
    assert cpu_threads("auto", 1, env={"OMP_NUM_THREADS": "1"}, cores=8) == 1
    assert cpu_threads("auto", 2, env={**launcher, "OMP_NUM_THREADS": "3"}, cores=8) == 3
    # accelerate launch without --cpu on a machine without GPU: OMP_NUM_THREADS=1 is its default, not the user's
    assert cpu_threads("auto", 1, env={**launcher, "OMP_NUM_THREADS": "1"}, cores=8) == 8
    assert cpu_threads("auto", 2, env={"OMP_NUM_THREADS": "lots"}, cores=8) == 4


# ----------------------------------------------------------------------------- non-finite losses


def test_nonfinite_steps_are_skipped_and_counted(recipe_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(NONFINITE_ENV, "2,3")
    assert run_here(recipe_file, out, "run.max_nonfinite=3", "optim.steps=6", "run.eval_every=100") == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["finished"] and summary["nonfinite_total"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_total"] for r in records if "train/loss" in r] == [0, 2, 2]
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(recipe_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv(NONFINITE_ENV, ",".join(str(i) for i in range(1, 8)))
    assert run_here(recipe_file, out, "run.max_nonfinite=3") == 1
    err = capsys.readouterr().err
    assert "3 steps in a row had a non-finite loss" in err and "optim.lr" in err
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4]  # steps 1, 2, 3 skipped: stop at 4
    assert read_state(out / "checkpoints" / "step-0000004")["nonfinite_in_row"] == 3
    assert not (out / "student.safetensors").exists()


# ----------------------------------------------------------------------------- distributed


def test_two_processes_see_disjoint_samples_and_end_identical(recipe_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "bootstrap/run.py", str(recipe_file), f"run.output_dir={out}", "run.log_sample_keys=true",
           "optim.steps=6", "run.eval_every=3", "run.checkpoint_every=3"]
    result = run_subprocess(cmd, {"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 12
    sums = summary["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # identical student weights on both ranks

    seen = {}
    for rank in (0, 1):
        lines = (out / "sample_keys" / f"rank-{rank}.txt").read_text().split()
        rows = [lines[i:i + 3] for i in range(0, len(lines), 3)]
        assert len(rows) == 6 * 6  # 6 steps of 6 images
        seen[rank] = {}
        for epoch, _, key in rows:
            seen[rank].setdefault(epoch, []).append(key)
    # 60 images, 5 batches of 6 per rank and epoch: epoch 0 complete, epoch 1 started.
    for epoch in seen[0]:
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert not set(a) & set(b), f"ranks shared samples in epoch {epoch}"
    assert len(set(seen[0]["0"]) | set(seen[1]["0"])) == 60  # the first epoch covered the data once
    assert "rank 1" not in result.stdout  # one progress/log stream, from the main process


# ----------------------------------------------------------------------------- hardening (issue 16)


class _Payload:
    """A pickle that, when loaded, writes a file: what a tampered checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _malicious_pickle(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"state": _Payload(marker)}))


def test_a_tampered_checkpoint_never_runs_code(straight_run, recipe_file, tmp_path, capsys):
    import hashlib
    import shutil

    step4 = straight_run / "checkpoints" / "step-0000004"
    names = sorted(f.name for f in step4.iterdir())
    assert names == ["COMPLETE", "model.safetensors", "optimizer.pt", "rng-rank-0.safetensors", "state.json"]
    marker = tmp_path / "pwned"
    for name in names + ["custom_checkpoint_0.pkl", "random_states_0.pkl"]:
        copy = tmp_path / name.replace(".", "_") / "step-0000004"
        shutil.copytree(step4, copy)
        _malicious_pickle(copy / name, marker)
        code = run_here(recipe_file, tmp_path / f"run-{name}", f"run.resume={copy}")
        err = capsys.readouterr().err
        assert not marker.exists(), f"tampering {name} ran code"
        if name == "COMPLETE":  # the marker's content is never read
            assert code == 0
        else:
            assert code == 1 and str(copy / name) in err, (name, err)
    # An attacker who also fixes the SHA-256 in state.json: the file is still only loaded safely.
    for name in ("optimizer.pt", "model.safetensors", "rng-rank-0.safetensors"):
        run = tmp_path / f"copied-{name}"
        shutil.copytree(straight_run, run)
        ckpt = run / "checkpoints" / "step-0000004"
        shutil.rmtree(run / "checkpoints" / "step-0000008")
        _malicious_pickle(ckpt / name, marker)
        manifest = json.loads((ckpt / "state.json").read_text())
        manifest["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
        (ckpt / "state.json").write_text(json.dumps(manifest))
        assert run_here(recipe_file, run) == 1  # run.resume=auto on a copied run folder
        assert not marker.exists() and str(ckpt / name) in capsys.readouterr().err


def test_a_finished_run_rerun_says_so_and_changes_nothing(straight_run, recipe_file, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_here(recipe_file, run) == 0
    out = capsys.readouterr().out
    assert "is a finished run (step 8 of 8); nothing was changed" in out and "held-out alignment" not in out
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_the_end_metrics_of_a_resumed_finished_run_are_the_end_ones(straight_run, recipe_file, tmp_path):
    """Killed after its last checkpoint but before its outputs: the rerun writes them, with the end metrics."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    summary = json.loads((run / "train_summary.json").read_text())
    (run / "train_summary.json").unlink()
    assert run_here(recipe_file, run) == 0
    again = json.loads((run / "train_summary.json").read_text())
    assert again["heldout_end"] == summary["heldout_end"] != again["heldout_start"]


def test_a_changed_recipe_is_refused_before_anything_is_written(straight_run, recipe_file, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    shutil.rmtree(run / "checkpoints" / "step-0000008")
    saved = (run / "recipe.yaml").read_bytes()
    capsys.readouterr()
    assert run_here(recipe_file, run, "student.tokens=6", "optim.lr=2e-3") == 2
    err = capsys.readouterr().err
    assert "holds a run of another recipe" in err and "student.tokens: 5" in err and "optim.lr: 0.001" in err
    assert "run.resume=none" in err and (run / "recipe.yaml").read_bytes() == saved
    # Keys that do not change what is computed may change on resume.
    assert run_here(recipe_file, run, "run.eval_every=2", "data.num_workers=0") == 0
    # run.resume=none starts anew and keeps the old checkpoints aside (auto would otherwise pick them).
    assert run_here(recipe_file, run, "student.tokens=6", "run.resume=none", "optim.steps=4",
                    "optim.warmup_steps=1") == 0
    assert "moved to" in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4]
    assert [s for s, _ in list_checkpoints(next(run.glob("checkpoints.replaced-*")))] == [4, 8]


def test_unwritable_output_folders_are_named_first(recipe_file, capsys):
    assert run_here(recipe_file, Path("/proc/not-a-folder/run")) == 2
    err = capsys.readouterr().err
    assert "run.output_dir=/proc/not-a-folder/run cannot be written" in err and "Traceback" not in err


def test_a_full_disk_while_checkpointing_is_named_and_the_earlier_checkpoint_kept(recipe_file, tmp_path,
                                                                                  monkeypatch, capsys):
    import errno

    real_save = torch.save
    calls = []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    assert run_here(recipe_file, out, "run.checkpoint_every=2") == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint step-0000004" in err and "the disk is full" in err
    assert "step-0000002 is intact" in err
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_truncated_training_shard_is_named_before_the_teacher_is_built(demo_data, recipe_file, tmp_path, capsys):
    import shutil

    data = tmp_path / "train"
    shutil.copytree(demo_data / "train", data)
    shard = sorted(data.glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    assert run_here(recipe_file, tmp_path / "run", f"data.train={data}") == 1
    err = capsys.readouterr().err
    assert f"shard {shard} is cut short" in err and "Traceback" not in err


def test_a_missing_evaluation_set_is_named_before_training(recipe_file, tmp_path, capsys):
    assert run_here(recipe_file, tmp_path / "run", "run.final_report=true", f"eval.data={tmp_path}/no-such-set") == 2
    err = capsys.readouterr().err
    assert "eval.data" in err and "no-such-set" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_launches_whose_processes_do_not_join_are_stopped():
    from bootstrap.launch import ProcessCountError, check_process_count

    check_process_count(2, {"WORLD_SIZE": "2"})
    check_process_count(1, {}, parent_cmdline=["python", "-m", "accelerate", "launch", "bootstrap/run.py"])
    with pytest.raises(ProcessCountError, match="torchrun needs ACCELERATE_USE_CPU=1, e.g. ACCELERATE_USE_CPU=1 "
                                                "torchrun --standalone --nproc_per_node 2"):
        check_process_count(1, {"WORLD_SIZE": "2"})
    with pytest.raises(ProcessCountError, match="--num_processes 3 started one process only"):
        check_process_count(1, {"ACCELERATE_USE_CPU": "True"},
                            parent_cmdline=["accelerate", "launch", "--cpu", "--num_processes", "3", "x.py"])


def test_torchrun_on_a_cpu_without_the_accelerate_switch_stops(recipe_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "bootstrap/run.py", str(recipe_file), f"run.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "ACCELERATE_USE_CPU=1 torchrun" in result.stderr
    assert not (out / "recipe.yaml").exists()


def test_two_processes_count_every_skipped_sample(demo_data, recipe_file, tmp_path):
    from data.shards import ShardSink, iter_shard, resolve_shards

    data = tmp_path / "train"
    data.mkdir()
    bad = set()
    with ShardSink(data, maxcount=20) as sink:
        for url in resolve_shards(demo_data / "train"):
            for i, raw in enumerate(iter_shard(url)):
                sample = {k: v for k, v in raw.items() if k != "__url__"}
                if i % 7 == 3:  # a few in every shard: both ranks meet some
                    sample["png"] = sample["png"][:40]
                    bad.add(sample["__key__"])
                sink.write(sample)
        shards = sink.close()
    (data / "dataset.json").write_text(json.dumps({"shards": shards}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "bootstrap/run.py", str(recipe_file), f"run.output_dir={out}", f"data.train={data}",
           "optim.steps=5", "optim.warmup_steps=1", "run.eval_every=5", "run.checkpoint_every=5"]
    result = run_subprocess(cmd, {"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    loader = json.loads((out / "train_summary.json").read_text())["loader"]
    # 5 steps = one epoch of 60 on 2 ranks: every corrupt sample was met once, by one rank or the other.
    assert loader["skipped"] == len(bad) == sum(loader["per_rank"]) and min(loader["per_rank"]) > 0
    assert sorted(k.rsplit("#", 1)[1] for k in loader["skipped_samples"]) == sorted(bad)
    assert f"data: {len(bad)} sample(s) did not decode and were skipped (over 2 process(es)" in result.stdout
