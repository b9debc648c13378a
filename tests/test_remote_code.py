"""An open_clip folder whose config asks transformers to run the folder's own Python (`trust_remote_code`)
is refused wherever the project loads one, or tells users to, unless they opt in by name.

open_clip passes `text_cfg.tokenizer_kwargs` of a model config to `AutoTokenizer.from_pretrained`, and for a
`local-dir:` model the tokenizer is read from the folder itself: with `trust_remote_code: true` transformers
imports the tokenizer's Python file from there. Each test plants such a folder, whose code creates a file.
"""

import copy
import json

import pytest
import yaml
from safetensors.torch import save_file

from eval.__main__ import main as eval_main
from teachers import create_teacher
from teachers.base import TeacherSpecError
from test_eval import CLIP_SPEC, _one_thread, clip_pair, demo, write_run  # noqa: F401 (fixtures)

PLANTED_TOKENIZER = """
import os
import pathlib

if os.environ.get("PLANTED_MARKER"):
    pathlib.Path(os.environ["PLANTED_MARKER"]).touch()

from transformers import PreTrainedTokenizer


class PlantedTokenizer(PreTrainedTokenizer):
    pass
"""


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "planted-ran"
    monkeypatch.setenv("PLANTED_MARKER", str(path))
    return path


def planted_folder(folder, model_cfg, state_dict=None):
    """An open_clip `local-dir:` folder whose HF tokenizer is code of its own, loaded with trust_remote_code."""
    folder.mkdir()
    cfg = copy.deepcopy(model_cfg)
    cfg["text_cfg"].update(hf_tokenizer_name="planted/tokenizer", tokenizer_kwargs={"trust_remote_code": True})
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_planted.PlantedTokenizer", None]},
         "tokenizer_class": "PlantedTokenizer"}))
    (folder / "tokenization_planted.py").write_text(PLANTED_TOKENIZER)
    if state_dict is not None:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_python_m_eval_of_a_run_whose_teacher_is_such_a_folder_refuses_it(clip_pair, demo, tmp_path, marker,
                                                                          capsys):
    teacher, student = clip_pair
    folder = planted_folder(tmp_path / "teacher", CLIP_SPEC["model_cfg"], teacher.model.state_dict())
    run = tmp_path / "run"
    write_run(run, teacher, student, {"data": str(demo / "val"), "probe": False, "cost": False, "num_workers": 0})
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["teacher"] = {"kind": "openclip", "model": f"local-dir:{folder}",
                         "pretrained": str(folder / "open_clip_model.safetensors")}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert eval_main([str(run), "--no-progress", "--no-cost", "--no-rois"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "text_cfg.tokenizer_kwargs.trust_remote_code" in err and "trust_remote_code: true" in err
    assert not marker.exists()


@pytest.mark.parametrize("where", ["local-dir", "model_cfg"])
def test_a_teacher_spec_refuses_it_unless_it_opts_in(tmp_path, marker, where):
    folder = planted_folder(tmp_path / "teacher", CLIP_SPEC["model_cfg"])
    if where == "local-dir":
        spec = {"kind": "openclip", "model": f"local-dir:{folder}", "pretrained": None}
    else:  # a recipe's own model_cfg (the tokenizer would come from the Hub)
        cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        spec = {**CLIP_SPEC, "model_cfg": cfg}
    with pytest.raises(TeacherSpecError, match="trust_remote_code"):
        create_teacher(spec).tokenizer
    assert not marker.exists()
    with pytest.raises(TeacherSpecError, match="trust_remote_code must be true or false"):
        create_teacher({**spec, "trust_remote_code": "yes"})
    if where == "local-dir":  # opted in: the folder's tokenizer code is what the user asked for
        with pytest.warns(Warning):
            teacher = create_teacher({**spec, "trust_remote_code": True})
        with pytest.raises(Exception):  # the planted class is no working tokenizer; its module ran
            teacher.tokenizer
        assert marker.exists()


def test_the_export_loader_checks_the_folder_before_open_clip_reads_it(tmp_path, marker):
    from students.export import ExportError, load_openclip_export

    folder = planted_folder(tmp_path / "export", CLIP_SPEC["model_cfg"])
    with pytest.raises(ExportError) as info:
        load_openclip_export(folder)
    message = str(info.value)
    assert "\n" not in message and "text_cfg.tokenizer_kwargs.trust_remote_code" in message
    assert "trust_remote_code=True" in message
    assert not marker.exists()


def test_the_clip_benchmark_command_refuses_such_a_model_folder(tmp_path, marker, capsys):
    from eval.clip_benchmark import main

    folder = planted_folder(tmp_path / "export", CLIP_SPEC["model_cfg"])
    argv = ["eval", "--dataset", "wds/x", "--model", f"local-dir:{folder}", "--task", "zeroshot_classification"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--trust-remote-code" in err, err
    assert "text_cfg.tokenizer_kwargs.trust_remote_code" in err
    assert not marker.exists()
