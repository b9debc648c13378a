"""The benchmark scripts run (smallest settings, one model each) and report what they claim.

They are timed by hand, not in CI, so without these a benchmark could break unnoticed
(train_speed.py once crashed writing its shards). Each runs as a user runs it, in its own
process: the scripts set torch's thread count, which must not leak into the other tests.
Nothing here asserts a speed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def table_rows(text: str) -> list[list[str]]:
    """The data rows of the first Markdown table in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break  # the end of the first table
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    return table[2:]


def test_student_speed_counts_the_flops_of_the_clip_base_construction():
    out = run_script("student_speed.py", "--models", "clip_base", "--batch-sizes", "1", "--dtypes", "fp32",
                     "--warmup", "0", "--iters", "3", "--threads", "1")
    rows = {r[1]: r for r in table_rows(out)}
    teacher, student = rows["open_clip:ViT-B-16-quickgelu"], rows["sparseformer_btsp_openai_clip_base"]
    # ViT-B/16 at 224 px: 35.1 GFLOPs (2 per multiply-add); the script checks its count against
    # the analytic one and says so when they differ.
    assert float(teacher[4]) == 35.13 and "analytic ViT count" not in out
    assert float(student[4]) < float(teacher[4]) / 4  # 49 tokens instead of 197
    assert float(teacher[3]) == 86.2 and float(student[3]) < float(teacher[3])
    assert float(student[6]) > 0 and float(teacher[6]) > 0
    # Beside them, the teacher itself at the student's 49 tokens, untrained: 7 x 7 patches + the class token.
    budget = {k.split(", ")[1]: r for k, r in rows.items() if k.endswith("(untrained)")}
    assert set(budget) == {"at 112px (untrained)", "patch 32 (untrained)", "random 49 (untrained)"}
    for row in budget.values():  # the teacher's parameters; about a quarter of its FLOPs, one image timed
        assert float(row[3]) == 86.2 and float(teacher[4]) / 5 < float(row[4]) < float(teacher[4]) / 3.5
        assert float(row[6]) > 0 and row[8].endswith("x")  # img/s, and speed vs teacher
    # The same blocks on 50 tokens; the patch embedding reads 112^2 pixels at 112 px and all 224^2 with 32-px patches
    # (4x its multiply-adds), and random dropping embeds all 196 patches before it drops 147.
    flops = [float(budget[k][4]) for k in ("at 112px (untrained)", "patch 32 (untrained)", "random 49 (untrained)")]
    assert flops == sorted(flops) and flops[1] - flops[0] == pytest.approx(2 * 3 * 49 * 768 * (32 ** 2 - 16 ** 2) / 1e9,
                                                                           abs=0.011)


def test_student_speed_puts_a_siglip_student_beside_its_map_pooled_teacher():
    out = run_script("student_speed.py", "--models", "siglip_base", "--batch-sizes", "1", "--dtypes", "fp32",
                     "--warmup", "0", "--iters", "3", "--threads", "1")
    rows = {r[1]: r for r in table_rows(out)}
    teacher = rows["timm:vit_base_patch16_siglip_224"]
    student = rows["sparseformer from vit_base_patch16_siglip_224"]
    # 196 patches without a class token, the MAP head: counted and analytic agree (the script says when not).
    assert float(teacher[4]) == 35.42 and "analytic ViT count" not in out
    assert float(student[4]) < float(teacher[4]) / 4 and float(student[3]) < float(teacher[3])


def test_student_speed_puts_a_rotary_student_beside_its_teacher():
    out = run_script("student_speed.py", "--models", "dinov3_base", "--batch-sizes", "1", "--dtypes", "fp32",
                     "--warmup", "0", "--iters", "3", "--threads", "1")
    rows = {r[1]: r for r in table_rows(out)}
    teacher, student = rows["timm:vit_base_patch16_dinov3"], rows["sparseformer from vit_base_patch16_dinov3"]
    # 256 patches, a class token and 4 registers at 256 px: counted and analytic agree (rotations are elementwise).
    assert float(teacher[4]) == 47.15 and "analytic ViT count" not in out and teacher[2] == "256"
    assert float(student[4]) < float(teacher[4]) / 4 and float(student[3]) < float(teacher[3])


def test_train_speed_times_teacher_student_and_data(tmp_path):
    results = tmp_path / "train_speed.json"
    out = run_script("train_speed.py", "--models", "clip_base", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                     "--num-workers", "0", "--image-size", "240", "--threads", "1", "--json", str(results))
    [r] = json.loads(results.read_text())
    assert r["model"] == "clip_base" and r["student_tokens"] == 49 and r["image_size"] == [224, 224]
    for run in (r, r["cached"]):
        assert abs(sum(run["share"].values()) - 1) < 1e-6 and run["img_per_s"] > 0
        assert run["compute_img_per_s"] >= run["img_per_s"]
    online, cached = table_rows(out)
    assert online[0] == cached[0] == "clip_base" and online[2] == "49"
    assert (online[3], cached[3]) == ("online", "cached") and cached[6] == "0%"  # no teacher forward
    assert f"cached/online speed (clip_base): {r['cached_over_online']:.2f}x" in out
    assert r["caching"]["img_per_s"] > 0 and r["caching"]["teacher_inference_img_per_s"] > 0


def test_train_speed_times_a_supervised_step_beside_an_alignment_step_of_the_same_student(tmp_path):
    results = tmp_path / "train_speed.json"
    out = run_script("train_speed.py", "--models", "augreg_base", "--modes", "online,labels", "--batch-size", "2",
                     "--steps", "1", "--warmup", "0", "--num-workers", "0", "--image-size", "240", "--threads", "1",
                     "--json", str(results))
    [r] = json.loads(results.read_text())
    assert "cached" not in r and r["labels"]["targets"] == "labels" and r["labels"]["student_tokens"] == 49
    online, labels = table_rows(out)
    assert (online[3], labels[3]) == ("online", "labels") and labels[6] == "0%"  # no teacher forward
    assert f"labels/align speed (augreg_base): {r['labels_over_online']:.2f}x" in out


def test_data_speed_times_each_decode_path_and_the_reduced_difference():
    out = run_script("data_speed.py", "--images", "12", "--rounds", "1", "--batch-size", "4", "--size", "64",
                     "--paths", "today", "full", "reduced", "fast", "torchvision", "--max-size", "96",
                     "--diff-views", "2")
    rows = table_rows(out)
    labels = ["today", "full", "reduced", "fast", "torchvision", "fast, --max-size 96 shards"]
    uint8 = [label for label in labels if label != "torchvision"]  # a transform that renders uint8 views
    kinds = [("train", labels), ("train, 1 worker", labels), ("train, 1 worker, uint8 batches", uint8),
             ("eval", labels)]
    assert [(r[0], r[1]) for r in rows] == [(kind, label) for kind, names in kinds for label in names]
    assert all(float(r[2]) > 0 for r in rows)
    assert [r[4] for r in rows if r[1] == "today"] == ["1.00"] * 4  # ratios against today
    assert re.search(r"generated 12 JPEGs .* mean \d+ x \d+ px, \d+ KB, .* load average", out)
    # 12 images x 2 views, and one evaluation view each: the views decoded smaller and whole, how far from full.
    for path in ("reduced", "fast"):
        said = out.split(f"{path} path against full decoding")[1]
        assert re.search(r"train: decoded smaller \(\d+ views\) [\d.]+ / \d+ / \d+; .*all \(24 views\) [\d.]+ / \d+ / "
                         r"\d+", said)
        assert re.search(r"eval: .*all \(12 views\)", said)


def test_data_speed_names_what_a_path_it_cannot_run_needs(tmp_path):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("data_speed", ROOT / "benchmarks" / "data_speed.py")
    data_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_speed)
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_speed.py"), "--paths", "cuda"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            "data_speed.py: error: decode path 'cuda' needs a CUDA GPU (torch.cuda.is_available() is False here): run "
            "it on a GPU machine, or leave it out of --paths")
    # The batched GPU path's code, run with the CPU as its device.
    data_speed.make_jpeg_shards(tmp_path, 6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's decoders are deprecated since 0.29
        for train in (True, False):
            assert data_speed.gpu_rate(tmp_path, "cuda", 32, 2, train=train, device="cpu") > 0


def test_tome_speed_puts_tome_at_2x_and_4x_fewer_flops_beside_the_student():
    out = run_script("tome_speed.py", "--models", "clip_base", "--batch-sizes", "1", "--warmup", "0", "--iters", "3",
                     "--threads", "1")
    rows = {r[1]: r for r in table_rows(out)}
    teacher, student = rows["teacher"], rows["sparseformer_btsp_openai_clip_base"]
    two, four = rows["ToMe ~2x fewer FLOPs"], rows["ToMe ~4x fewer FLOPs"]
    assert float(teacher[5]) == 35.13 and teacher[3] == "197"
    # r = 16 per block, the paper's ViT-B setting; 4x needs a front-loaded schedule.
    assert two[2].startswith("r=16: 16,16,") and "of the patch tokens per block" in four[2]
    assert 1.8 <= float(two[6].rstrip("x")) <= 2.2 and 3.6 <= float(four[6].rstrip("x")) <= 4.4
    assert float(two[4]) == float(teacher[4])  # ToMe runs the teacher's own weights
    assert float(student[6].rstrip("x")) > 4 and all(float(r[7]) > 0 for r in rows.values())


def test_mllm_tokens_counts_what_fewer_image_tokens_save_a_llava_7b():
    out = run_script("mllm_tokens.py", "--clip-model", "ViT-B-32-quickgelu", "--students", "17",
                     "--prompt-tokens", "8", "--threads", "1", "--video-tower", "ViT-B-32-quickgelu",
                     "--video-frames", "4", "--video-students", "9", "--video-replicates", "1", "2")
    clip, student = table_rows(out)
    assert clip[0] == "CLIP ViT-B-32-quickgelu" and student[0].startswith("student of it, 17 tokens")
    assert (clip[1], clip[2], student[1], student[2]) == ("49", "57", "17", "25")  # 7x7 patches; + 8 prompt tokens
    # ViT-B/32 at 224 px: 4.4 GMACs, 8.8 GFLOPs; the script checks its count against the analytic one.
    assert float(clip[3]) == 8.8 and "analytic ViT count" not in out
    assert 0 < float(student[3]) < float(clip[3])
    # Llama-2-7B prefill is ~2 FLOPs per weight per token: 32 layers x (4*4096^2 + 3*4096*11008) weights.
    weights = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    for row in (clip, student):
        assert abs(float(row[5]) - 2 * weights * int(row[2]) / 1e9) < 2
        assert float(row[9]) == int(row[2]) / 2  # fp16 K and V: 2 * 32 layers * 4096 * 2 bytes = 0.5 MiB a token
    # The video table: 4 frames of 7x7 patches pooled 2x2 to 4x4 = 16 tokens each, against video students whose
    # 8 latent tokens (+ the class token) see the whole clip, once or twice over time.
    tower, once, twice = table_rows(out[out.index("one video of 4 frames"):])
    assert (tower[1], once[1], twice[1]) == ("64", "9", "17")
    assert abs(float(tower[3]) - 4 * float(clip[3])) < 0.2  # the tower on every frame: 4 x 8.8 GFLOPs
    assert float(once[3]) < float(twice[3]) < float(tower[3])
    # Qwen2-7B with 4 key/value heads: 2 * 28 layers * 4 heads * 128 * 2 bytes = 56 KiB a token.
    assert abs(float(tower[9]) - int(tower[2]) * 56 / 1024) < 0.1


def test_student_speed_puts_sparsifiners_beside_their_dense_teacher():
    out = run_script("student_speed.py", "--models", "sparsifiner_vitb16", "--batch-sizes", "1", "--dtypes", "fp32",
                     "--warmup", "0", "--iters", "3", "--threads", "1")
    rows = {r[1]: r for r in table_rows(out)}
    teacher, k25, k10 = (rows["timm:vit_base_patch16_224 (dense)"], rows["Sparsifiner keep 0.25"],
                         rows["Sparsifiner keep 0.1"])
    # ViT-B/16: QK^T and AV are 2 * 12 heads * 197^2 * 64 * 12 blocks = 0.715 G multiply-adds
    assert teacher[2] == "197" and float(teacher[6]) == 0.715 == float(teacher[7])
    assert float(k10[7]) < float(k25[7]) < float(teacher[7]) < float(k25[6])  # masked < dense < executed
    assert 0.25 < float(k25[8]) < 0.27 and float(k25[4]) > 0


def test_video_speed_puts_a_video_student_beside_its_teacher_over_frames():
    out = run_script("video_speed.py", "--clip-model", "ViT-B-32-quickgelu", "--tokens", "17", "--frames", "2", "4",
                     "--threads", "1", "--iters", "3", "--warmup", "1")
    rows = table_rows(out)
    assert [(r[0], r[1]) for r in rows] == [("2", "teacher over frames"), ("2", "video student"),
                                            ("4", "teacher over frames"), ("4", "video student")]
    # ViT-B/32: 8.8 GFLOPs a frame, every frame; the student's 17 tokens see the clip, its convolution every frame.
    assert float(rows[0][3]) == 17.6 and float(rows[2][3]) == 35.3
    assert rows[1][2] == rows[3][2] == "17 per clip"
    assert float(rows[1][3]) < float(rows[3][3]) < float(rows[2][3])
