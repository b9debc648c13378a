"""CLIP_benchmark scores our OpenCLIP exports on our evaluation sets as `python -m eval` does.

`data.export_eval_set` writes an evaluation set in CLIP_benchmark's `wds/` layout; `eval.clip_benchmark`
runs CLIP_benchmark's CLI with `students` imported. The tests that run CLIP_benchmark itself
skip where it is not installed (`pip install -e ".[clip_benchmark]"`).
"""

import io
import json
import sys
import tarfile
import warnings

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


def test_clip_benchmark_cli_without_clip_benchmark_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # what an absent package looks like
    assert clip_benchmark_main(["eval", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CLIP_benchmark is not installed") and INSTALL in err and err.count("\n") == 1


def test_clip_benchmark_scores_the_openclip_export_as_our_report_does(clip_pair, demo, wds_demo,  # noqa: F811
                                                                     tmp_path):
    """Every zero-shot prediction of CLIP_benchmark on the exported student equals ours."""
    pytest.importorskip("clip_benchmark", reason=f"CLIP_benchmark is not installed ({INSTALL})")
    teacher, student = clip_pair
    export = export_openclip(student, teacher, tmp_path / "export")
    wds, info = wds_demo
    report = evaluate(student, teacher, str(demo / "val"), probe=False, cost=False, rois=False, num_workers=0,
                      progress=False)["zero_shot"]

    result = tmp_path / "result.json"
    argv = ["eval", "--dataset", "wds/demo", "--dataset_root", str(wds), "--model", f"local-dir:{export}",
            "--task", "zeroshot_classification", "--no_amp", "--num_workers", "0", "--batch_size", "8",
            "--output", str(result), "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CLIP_benchmark's and its dependencies' deprecation warnings
        assert clip_benchmark_main(argv) == 0
    metrics = json.loads(result.read_text())["metrics"]
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
