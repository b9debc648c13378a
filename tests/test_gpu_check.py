"""benchmarks/gpu_check.sh: its dry run goes through the whole GPU check on this CPU and writes the check's one
table; input it cannot run with gets one line naming the fix. Nothing here asserts a speed."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_benchmarks import table_rows

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@functools.cache
def gpu_check():
    """benchmarks/gpu_check.py as a module (registered: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def number(text: str) -> float:
    return float(text.rstrip("%"))


@pytest.mark.slow
def test_the_dry_run_writes_the_checks_table(tmp_path):
    out = tmp_path / "check.md"
    # A peak of 1 GFLOP/s, so that the tiny steps' MFU shows in the table's one decimal.
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--peak-tflops", "0.001"],
                          cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert proc.stdout == text  # the same table on stdout and in the file
    assert text.startswith("dry run (tiny sizes") and text.count("\n|---") == 1  # one table
    columns = text.splitlines()[2].strip("|").split("|")
    assert [c.strip() for c in columns] == list(gpu_check().COLUMNS)
    rows = table_rows(text)
    assert all(len(r) == len(columns) for r in rows)
    by_check = {}
    for r in rows:
        by_check.setdefault(r[0], []).append(dict(zip(gpu_check().COLUMNS, r)))

    # The CUDA tests ran, and without CUDA were skipped, every one.
    (tests,) = by_check.pop("pytest -m gpu")
    skipped = "skipped (no CUDA here)" in tests["note"] and "passed" not in tests["note"]
    assert skipped == (not torch.cuda.is_available())

    # The loader with the dry run's 1 and 2 workers, and the GPU decoding code (on the CPU).
    assert {k for k in by_check if k != "bootstrapping step"} == {"loader, 1 worker", "loader, 2 workers",
                                                                  "GPU decode (cuda)"}
    for check in ("loader, 1 worker", "loader, 2 workers", "GPU decode (cuda)"):
        (row,) = by_check[check]
        assert number(row["images/s"]) > 0 and row["batch"] == "4"

    # Every construction online and cached, eager and compiled, with its steps, images and FLOPs per step.
    steps = by_check["bootstrapping step"]
    assert [(r["construction"], r["targets"], r["torch.compile"]) for r in steps] == [
        (c, t, compiled) for c, compiled, t in itertools.product(("clip_base", "clip_large"), ("no", "yes"),
                                                                 ("online", "cached"))]
    flops = {}
    for r in steps:
        rate, gflop = number(r["steps/s"]), number(r["GFLOP/step"])
        assert rate > 0 and gflop > 0
        assert number(r["images/s"]) == pytest.approx(4 * rate, rel=0.02)
        # MFU = FLOPs per step x steps/s / the peak (1 GFLOP/s here), in percent with one decimal.
        assert number(r["MFU"]) == pytest.approx(100 * gflop * rate, rel=0.02, abs=0.06)
        assert flops.setdefault((r["construction"], r["targets"]), gflop) == gflop  # counted once, eagerly
    for c in ("clip_base", "clip_large"):
        # Online, the step also runs the teacher's forward; with cached targets it does not.
        assert flops[(c, "online")] > flops[(c, "cached")]
    assert flops[("clip_large", "cached")] > flops[("clip_base", "cached")]
    assert "caching pass" in steps[1]["note"] and "compiles the training forward" in steps[2]["note"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the line a machine without CUDA gets")
def test_without_cuda_the_check_says_to_add_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "x.md")], cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "x.md").exists()
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: error: no CUDA GPU here (torch.cuda.is_available() is False): run it on a machine with one, or "
        "add --dry-run to run the same code on this CPU at tiny sizes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the line a machine without CUDA gets")
def test_a_gpu_decode_asked_for_without_a_gpu_gets_one_line(capsys):
    assert gpu_check().main(["--dry-run", "--gpu-decode", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gpu_check: error: --gpu-decode cuda needs a CUDA GPU (torch.cuda.is_available() is False here): "
                   "run it on a GPU machine, or leave --gpu-decode out (a dry run times the same code on the CPU)"]


@pytest.mark.parametrize("args, says", [
    (["--dry-run", "--models", "clip_base,clip_huge"], "unknown construction 'clip_huge' in --models; choose from "
                                                        "clip_base, clip_large"),
    (["--dry-run", "--warmup", "0"], "--warmup must be at least 1"),
    (["--dry-run", "--workers", "8", "0"], "--workers must be at least 1 each"),
    (["--dry-run", "--peak-tflops", "0"], "--peak-tflops must be above 0"),
    (["--dry-run", "--out", "no/such/folder/check.md"], "the folder no/such/folder does not exist"),
])
def test_other_bad_input_gets_one_line(args, says, capsys):
    assert gpu_check().main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gpu_check: error: ") and says in line


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.5),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("Tesla T4", None),
])
def test_the_peak_is_named_per_gpu_model_and_can_be_given(name, peak, monkeypatch):
    check = gpu_check()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got, where = check.peak_tflops(torch.device("cuda"), None)
    assert got == peak and (peak is not None or "--peak-tflops" in where)
    assert check.peak_tflops(torch.device("cuda"), 500.0) == (500.0, "--peak-tflops")
