"""Recipes, run folders and command lines against input a user receives (issue 32, items 7 and 17).

Each test reproduced its problem first: ``pipe:`` URLs in a recipe, a run folder's recipe.yaml and
on the command line ran their command; a string step in state.json ended in a traceback; an
inline ``--teacher`` mapping was taken for a file name ("File name too long");
``SPARSIFINER_CPU_KERNEL=0`` printed nothing although documented to.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from test_bootstrap import demo_data, recipe_file, run_here  # noqa: F401 (fixtures)
from test_eval import clip_pair, demo, write_run  # noqa: F401 (fixtures)


def _pipe(marker, shard) -> str:
    return f"pipe:touch {marker}; cat {shard}"


# ----------------------------------------------------------------------------- item 7: pipe: URLs


@pytest.mark.parametrize("key", ["data.train", "data.val", "eval.data"])
def test_a_pipe_url_in_a_recipe_is_refused_before_any_work(recipe_file, demo_data, tmp_path, capsys, key):  # noqa: F811
    marker = tmp_path / "pwned"
    url = _pipe(marker, demo_data / "train" / "shard-000000.tar")
    extra = ["run.final_report=true"] if key == "eval.data" else []
    assert run_here(recipe_file, tmp_path / "run", f"{key}='{url}'", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}") and "data.allow_pipe: true" in err[0]
    assert not marker.exists() and not (tmp_path / "run" / "recipe.yaml").exists()


def test_the_recipe_opt_in_lets_training_stream_through_a_pipe(recipe_file, demo_data, tmp_path, capfd):  # noqa: F811
    marker = tmp_path / "ran"
    url = f"pipe:touch {marker}; cat {demo_data / 'train'}/shard-{{000000..000002}}.tar"
    assert run_here(recipe_file, tmp_path / "run", f"data.train='{url}'", "data.allow_pipe=true",
                    "data.resampled=true", "data.epoch_samples=60", "optim.steps=2", "run.eval_every=2") == 0
    assert marker.exists() and "running the shell command `touch" in capfd.readouterr().err


def test_eval_refuses_pipe_urls_of_a_run_folder_and_the_command_line(clip_pair, demo, tmp_path, capsys):  # noqa: F811
    from eval.__main__ import main as eval_main
    from eval.compare import main as compare_main

    teacher, student = clip_pair
    marker = tmp_path / "pwned"
    url = _pipe(marker, demo / "val" / "shard-000000.tar")
    run, other = tmp_path / "run", tmp_path / "other"
    write_run(run, teacher, student, {"data": url, "num_workers": 0})
    write_run(other, teacher, student, {"data": str(demo / "val"), "num_workers": 0})
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"] = {"allow_pipe": True}  # a run folder cannot opt in for the one who evaluates it
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for argv in ([str(run)], [str(other), "--data", url], ["--student", str(run / "student_config.json"),
                                                           "--teacher", str(run / "recipe.yaml"), "--data", url]):
        assert eval_main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "runs a shell command" in err[0] and "--allow-pipe" in err[0], err
    for argv in ([str(run), str(other)], [str(other), str(run), "--data", url]):
        with pytest.raises(SystemExit, match="runs a shell command.*--allow-pipe"):
            compare_main([*argv, "--out", str(tmp_path / "cmp"), "--no-progress", "--no-probe", "--no-cost"])
    assert not marker.exists()


# ----------------------------------------------------------------------------- item 17: smaller ones


def test_a_state_json_step_that_is_no_integer_is_one_line(recipe_file, tmp_path, capsys):  # noqa: F811
    from bootstrap.checkpoint import COMPLETE, FORMAT, STATE_JSON

    ckpt = tmp_path / "checkpoints" / "step-0000004"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE).write_text("")
    (ckpt / STATE_JSON).write_text(json.dumps({"format": FORMAT, "train_state": {"step": "4"}, "files": {}}))
    assert run_here(recipe_file, tmp_path / "run", f"run.resume={ckpt}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train state 'step' = '4' is not what a run writes" in err[0] and str(ckpt) in err[0]


def test_an_inline_teacher_mapping_of_any_length_is_read_as_yaml():
    from eval.__main__ import _teacher_spec

    spec = "{kind: openclip, model: ViT-B-16, pretrained: openai, " + ", ".join(f"k{i}: {i}" for i in range(60)) + "}"
    assert len(spec) > 255  # longer than a file name may be
    assert _teacher_spec(spec)["model"] == "ViT-B-16"


def test_switching_the_mask_kernel_off_says_so_once():
    code = ("from students.sparsifiner import mask_kernel as m\n"
            "assert not m.available() and not m.available() and m.unavailable_reason() == 'SPARSIFINER_CPU_KERNEL=0'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "SPARSIFINER_CPU_KERNEL": "0"})
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SPARSIFINER_CPU_KERNEL=0" in lines[0] and "torch.topk is used instead" in lines[0]


def test_the_pixel_limit_is_a_recipe_key():
    from bootstrap.config import RecipeError, load_recipe

    base = {"teacher": {"kind": "openclip"}, "data": {"train": "x"}}
    assert load_recipe(base=base).data.max_pixels == 64_000_000
    assert load_recipe(base=base, overrides=["data.max_pixels=null"]).data.max_pixels is None
    with pytest.raises(RecipeError, match="data.max_pixels must be at least 1 or null"):
        load_recipe(base=base, overrides=["data.max_pixels=0"])


# ----------------------------------------------------------------------------- optimizer values (issue 32 item 12)
@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", r"optim.lr must be a finite number, got inf"),
    ("optim.min_lr=.nan", r"optim.min_lr must be a finite number, got nan"),
    ("optim.weight_decay=-1", r"optim.weight_decay must be >= 0 \(0: none\), got -1"),
    ("optim.betas=[2,0.5]", r"optim.betas must be two numbers in \[0, 1\) .*got \[2.0, 0.5\]"),
    ("optim.eps=-1", r"optim.eps must be above 0 .*got -1"),
    ("optim.grad_clip=.inf", r"optim.grad_clip must be a finite number, got inf"),
])
def test_optimizer_values_are_checked_with_the_recipe(override, message):
    from bootstrap.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "recipes" / "demo.yaml", [override])


def test_a_diverging_run_stops_in_one_line_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    """A finite but absurd learning rate blows the weights up: the held-out check (or the checkpoint guard) stops the
    run with one line, and no checkpoint holds non-finite weights."""
    import torch
    from safetensors.torch import load_file

    from data.demo import make_demo_dataset
    from test_bootstrap import TINY_RECIPE

    data = tmp_path / "data"
    make_demo_dataset(data, num=36, size=32, val_fraction=1 / 6, shard_size=20)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["data"].update(train=str(data / "train"), val=str(data / "val"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert run_here(path, out, "optim.lr=1e30", "optim.grad_clip=null", "optim.warmup_steps=0", "run.eval_every=2",
                    "run.checkpoint_every=1", "run.max_nonfinite=100") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: step ") and err.count("\n") == 1 and "not finite" in err, err
    assert "the last good checkpoint is in" in err
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values()), ckpt
    assert not (out / "student.safetensors").exists()


# ----------------------------------------------------------------------------- as a new user (issue 32 item 18)
def test_exporting_a_run_again_says_its_export_is_there_and_writes_nothing(tmp_path, clip_pair, demo,  # noqa: F811
                                                                          capsys):
    from students.export import SOURCE_FILE, main as export_main

    teacher, student = clip_pair
    run = tmp_path / "run"
    write_run(run, teacher, student, {"data": str(demo / "val")})
    assert export_main([str(run), "--no-verify"]) == 0  # as the run's end does
    capsys.readouterr()
    out = run / "export_openclip"
    stamp = (out / "open_clip_model.safetensors").stat().st_mtime_ns
    assert export_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} already holds this run's export (of the same student.safetensors)")
    assert err.count("\n") == 1 and "--overwrite" in err
    assert (out / "open_clip_model.safetensors").stat().st_mtime_ns == stamp  # nothing written
    # Another student in the run folder: its export is refused unless --overwrite, as before.
    (out / SOURCE_FILE).write_text(json.dumps({"student_sha256": "another"}))
    assert export_main([str(run)]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert export_main([str(run), "--overwrite", "--no-verify"]) == 0


def test_compare_never_replaces_a_comparison_unasked(tmp_path, capsys):
    from eval.compare import main as compare_main

    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"already holds a comparison \(compare.json\); pass --overwrite"):
        compare_main([str(tmp_path / "nowhere"), "--out", str(out)])
    assert (out / "compare.json").read_text() == "{}"
    with pytest.raises(SystemExit, match="does not exist"):  # with --overwrite the work (here: its checks) goes on
        compare_main([str(tmp_path / "nowhere"), "--out", str(out), "--overwrite"])
