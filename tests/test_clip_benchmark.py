"""CLIP_benchmark scores our OpenCLIP exports on our evaluation sets as `python -m eval` does.

`data.export_eval_set` writes an evaluation set in CLIP_benchmark's `wds/` layout; `eval.clip_benchmark`
runs CLIP_benchmark's CLI with `students` imported. The tests that run CLIP_benchmark itself
skip where it is not installed (`pip install -e ".[clip-benchmark]"`).
"""

import contextlib
import io
import os
import json
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.evalsets import build_eval_loader, eval_dataset, iter_eval_samples
from data.export_eval_set import export_clip_benchmark, main as export_main
from eval import evaluate
from eval.clip_benchmark import INSTALL, main as clip_benchmark_main
from eval.features import extract, teacher_student_step
from eval.zeroshot import zero_shot_classifier, zero_shot_logits
from students.export import export_openclip
from test_eval import _one_thread, clip_pair, demo  # noqa: F401 (fixtures)



def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def wds_demo(demo, tmp_path_factory):  # noqa: F811
    """The demo fixture's val split (20 images, 10 classes) in CLIP_benchmark's layout, 2 shards."""
    out = tmp_path_factory.mktemp("wds") / "demo"
    info = export_clip_benchmark(str(demo / "val"), out, maxcount=12, progress=False)
    return out, info


def test_export_writes_clip_benchmarks_wds_layout_with_the_same_pixels(demo, wds_demo):  # noqa: F811
    out, info = wds_demo
    assert (out / "test" / "nshards.txt").read_text() == "2\n" and info["num_shards"] == 2
    from data.demo import DEMO_CLASSNAMES, DEMO_TEMPLATES

    assert (out / "classnames.txt").read_text().splitlines() == DEMO_CLASSNAMES
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == [
        t.replace("{}", "{c}") for t in DEMO_TEMPLATES]  # the demo set's own, as python -m eval uses them
    samples = {**_members(out / "test" / "0.tar"), **_members(out / "test" / "1.tar")}
    assert len(samples) == 2 * 20 and sorted(samples)[:2] == ["s0000000.cls", "s0000000.png"]
    # Every image as evaluation decodes it, pixel for pixel, with its label.
    for i, (image, label) in enumerate(iter_eval_samples(eval_dataset(str(demo / "val")))):
        with Image.open(io.BytesIO(samples[f"s{i:07d}.png"])) as png:
            assert png.format == "PNG" and np.array_equal(np.asarray(png.convert("RGB")), np.asarray(image))
        assert int(samples[f"s{i:07d}.cls"]) == label


def test_export_templates_option_skips_bad_images_and_refuses_to_overwrite(tmp_path, capsys):
    folder = tmp_path / "folder"
    for name, colour in (("cat", "red"), ("dog", "blue")):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(folder / name / f"{i}.png")
    (folder / "dog" / "1.png").write_bytes(b"not a png")
    out = tmp_path / "wds"
    with pytest.warns(RuntimeWarning, match="cannot read evaluation image .*1.png"):
        assert export_main([str(folder), str(out), "--templates", "simple", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert f"skipped 1 unreadable image(s): {folder / 'dog' / '1.png'}" in printed.err
    assert "python -m eval.clip_benchmark eval --dataset wds/wds --dataset_root" in printed.out
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) == 7 and all("{c}" in t for t in templates)  # open_clip's simple set, as {c}
    assert [int(m) for n, m in _members(out / "test" / "0.tar").items() if n.endswith(".cls")] == [0, 0, 1]
    assert export_main([str(folder), str(out), "--quiet"]) == 2
    assert "already holds shards (0.tar, ...); pass --overwrite" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nowhere"), str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: evaluation data {tmp_path / 'nowhere'} does not exist")


def test_the_printed_and_documented_commands_are_the_same_command():
    """The documented command (docs/evaluation.md) is the one `data.export_eval_set` prints (float32, the loader in the main process:
    CLIP_benchmark's default 4 workers refuse a set of fewer shards), with the demo's folders filled in."""
    from data.export_eval_set import clip_benchmark_command

    lines = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("python -m eval.clip_benchmark eval "))
    command = [lines[first]]
    while command[-1].endswith("\\"):  # continued on the next line
        command.append(lines[first + len(command)])
    documented = " ".join(" ".join(command).replace("\\", " ").split())
    assert documented == clip_benchmark_command("demo_wds", "demo_wds", model="local-dir:runs/demo/export_openclip")
    assert "--no_amp" in documented and "--num_workers 0" in documented


def test_clip_benchmark_missing_a_dependency_names_it(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def without_requests(name, *args, **kwargs):
        if name.startswith("clip_benchmark"):
            raise ModuleNotFoundError("No module named 'requests'", name="requests")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_requests)
    assert clip_benchmark_main(["eval", "--help"]) == 2
    err = capsys.readouterr().err
    assert "the module 'requests' it needs is missing" in err and err.count("\n") == 1


def test_clip_benchmark_cli_without_clip_benchmark_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # what an absent package looks like
    assert clip_benchmark_main(["eval", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CLIP_benchmark is not installed") and INSTALL in err and err.count("\n") == 1


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def test_clip_benchmark_scores_the_openclip_export_as_our_report_does(clip_pair, demo, wds_demo,  # noqa: F811
                                                                     tmp_path):
    """Every zero-shot prediction of CLIP_benchmark on the exported student equals ours."""
    pytest.importorskip("clip_benchmark", reason=f"CLIP_benchmark is not installed ({INSTALL})")
    teacher, student = clip_pair
    export = export_openclip(student, teacher, tmp_path / "export")
    wds, info = wds_demo
    report = evaluate(student, teacher, str(demo / "val"), probe=False, cost=False, rois=False, num_workers=0,
                      progress=False)["zero_shot"]

    # The command data.export_eval_set prints, as printed (the export folder filled in), run in tmp_path.
    from data.export_eval_set import clip_benchmark_command

    printed = clip_benchmark_command(wds.name, str(wds), model=f"local-dir:{export}").split()
    assert printed[:3] == ["python", "-m", "eval.clip_benchmark"]
    with warnings.catch_warnings(), _cwd(tmp_path):
        warnings.simplefilter("ignore")  # CLIP_benchmark's and its dependencies' deprecation warnings
        assert clip_benchmark_main(printed[3:] + ["--quiet"]) == 0
    metrics = json.loads((tmp_path / f"{wds.name}_result.json").read_text())["metrics"]
    assert metrics["acc1"] == pytest.approx(report["student"]["top1"], abs=1e-6)
    assert metrics["acc5"] == pytest.approx(report["student"]["top5"], abs=1e-6)

    # Prediction by prediction: CLIP_benchmark's own loader, model loading, classifier and logits.
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics.zeroshot_classification import run_classification
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier as cb_classifier
    from clip_benchmark.models import load_clip

    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{export}", None, None, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # webdataset's, on how CLIP_benchmark calls it
        dataset = build_dataset("wds/demo", root=str(wds), transform=transform, split="test")
    assert dataset.classes == info["classnames"] and dataset.templates == info["templates"]
    loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None, num_workers=0)
    cb_clf = cb_classifier(model.eval(), tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    cb_logits, cb_labels = run_classification(model, cb_clf, loader, "cpu", amp=False)

    ours_loader, names = build_eval_loader(str(demo / "val"), teacher.eval_transform(), 8, 0)
    feats = extract(ours_loader, teacher_student_step(teacher, student), progress=False)
    clf = zero_shot_classifier(teacher, names, "demo")
    logits = zero_shot_logits(feats["student"], clf)
    torch.testing.assert_close(cb_clf.float(), clf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cb_logits, logits, atol=1e-3, rtol=1e-4)
    assert torch.equal(cb_labels, feats["labels"])
    top5 = logits.topk(5, dim=1).indices
    assert torch.equal(cb_logits.topk(5, dim=1).indices, top5)  # top-1 and the ranking behind top-5
    # The random student's top-1 is one class throughout, but its rankings differ from image to image:
    assert len({tuple(r) for r in top5.tolist()}) > 1  # so the ranking check can fail
