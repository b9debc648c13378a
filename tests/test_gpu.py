"""What only a CUDA GPU can check (marker `gpu`: skipped without CUDA; `bash benchmarks/gpu_check.sh` runs them).

* bf16 autocast of both student families against float32, in every training phase and in evaluation, on
  clip_base's teacher (ViT-B/16, random weights). The same comparison runs on the CPU too (emulated bf16, a small
  teacher), so that CI checks the test itself.
* Sparsifiner's key selection on CUDA (torch.topk) against the CPU's (the compiled kernel where it builds): the
  same mask bits, ties apart; and a whole model's masks and output.
* Targets cached on CUDA under bf16, replayed by a run on CUDA that never runs the teacher in its loop.

Tolerances, bf16 autocast against float32 (cosine per image of the outputs, relative difference of the loss,
cosine of the whole gradient):

    phase                          outputs   tokens   loss    gradient
    every phase but the one below  >= 0.9995           <= 0.5%  >= 0.999
    Sparsifiner's sparse phase     >= 0.999  >= 0.98   <= 5%    >= 0.95

Measured on the CPU (emulated bf16; the small teacher, three seeds, and ViT-B/16, one): SparseFormer cosines >=
0.99995, loss within 0.09%, gradient cosine >= 0.9999; Sparsifiner's reconstruct phase alike. Its sparse phase selects
each query's keys from the bf16 q and k, so keys near a tie flip (many, with a fresh predictor's nearly flat
approximations), and the student starts as its teacher, so the loss is a small difference of large terms: tokens
cosine 0.990-0.997, loss within 1.0% (0.6% on ViT-B/16), gradient cosine 0.964-0.987.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml

from test_bootstrap import run_here
from test_mask_kernel import approximations, combination_terms
from test_targets import K, cache_here, demo_data, store_of, write_recipe  # noqa: F401 (fixture)

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)

# On CUDA: clip_base's teacher. On the CPU (emulated bf16 is ~8x slower than float32): a small CLIP whose heads are
# 64 wide as ViT-B/16's, 64 patch tokens.
TEACHERS = {
    "cuda": {"kind": "openclip", "model": "ViT-B-16-quickgelu", "pretrained": None},
    "cpu": {"kind": "openclip", "model": "small-clip", "pretrained": None, "model_cfg": {
        "embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}},
}
# The recipes' students (recipes/clip_base.yaml, sparsifiner_clip_base.yaml).
STUDENTS = {"sparseformer": {}, "sparsifiner": {"kind": "sparsifiner", "keep_rate": 0.25}}

EXACT = {"output": 0.9995, "tokens": 0.9995, "loss": 0.005, "grad": 0.999}
SELECTED = {"output": 0.999, "tokens": 0.98, "loss": 0.05, "grad": 0.95}  # Sparsifiner's sparse phase


@pytest.fixture
def float32_is_float32():
    """A float32 reference computed in float32 on CUDA (no TF32 matmuls or convolutions)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def teacher_on(device: str):
    from teachers import create_teacher

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return create_teacher(TEACHERS[device]).to(device).eval()


def student_of(kind: str, teacher, device: str, **options):
    """The student of a family built from the teacher as the run builds it (the recipe's options, or these), with
    its phases."""
    from bootstrap.config import LossConfig, OptimConfig, student_options
    from students import family_of
    from students.family import PhaseContext

    options = student_options({**STUDENTS[kind], **options})
    family = family_of(options)
    student, policy = family.build(teacher, options)
    phases = family.phases(PhaseContext(options, student, teacher, LossConfig(), OptimConfig()))
    return family, student.to(device), policy, phases


def cosine(a, b) -> float:
    """The smallest cosine over the rows (images)."""
    return float(F.cosine_similarity(a.detach().double().flatten(1), b.detach().double().flatten(1)).min())


def training_pass(family, student, teacher, phase, images, dtype):
    """One training forward and backward of a phase: (outputs, loss, the whole gradient), under autocast `dtype`."""
    student.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        with torch.no_grad():
            target = teacher.targets(images, phase.needs)
        out = family.forward(student, images, phase.outputs, teacher.target != "proj")
        terms = {t.name: t.fn(out, target) for t in phase.terms}
        loss = sum(t.weight * terms[t.name] for t in phase.terms)
    loss.backward()
    grad = torch.cat([p.grad.double().flatten() for p in student.parameters() if p.grad is not None])
    return out, float(loss.detach()), grad


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", ["sparseformer", "sparsifiner"])
def test_bf16_autocast_agrees_with_float32_in_every_phase(kind, device, float32_is_float32):
    teacher = teacher_on(device)
    family, student, policy, phases = student_of(kind, teacher, device)
    images = torch.randn(4 if device == "cpu" else 8, 3, *teacher.preprocess.size, device=device)
    for phase in phases:
        family.enter(student, policy, phase)
        student.train()
        out32, loss32, grad32 = training_pass(family, student, teacher, phase, images, None)
        out16, loss16, grad16 = training_pass(family, student, teacher, phase, images, torch.bfloat16)
        tol = SELECTED if (kind, phase.name) == ("sparsifiner", "sparse") else EXACT
        where = f"{kind}, phase {phase.name}, {device}"
        for name, value in out32.items():
            if torch.is_tensor(value):
                assert cosine(out16[name], value) >= tol["tokens" if name == "tokens" else "output"], (where, name)
            else:  # per-block lists (approximations)
                for a, b in zip(out16[name], value):
                    assert cosine(a, b) >= tol["output"], (where, name)
        assert abs(loss16 - loss32) <= tol["loss"] * abs(loss32), where
        assert float(F.cosine_similarity(grad16, grad32, dim=0)) >= tol["grad"], where
    student.eval()
    with torch.no_grad():
        fp32 = student(images)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = student(images)
    assert torch.isfinite(bf16).all() and cosine(bf16, fp32) >= SELECTED["output"]


def test_a_sparsifiner_evaluates_under_bf16_autocast_where_a_cpu_takes_the_sparse_product():
    """K = 65 // 2 = 32 >= 4 x top-8 basis rows: evaluation on a CPU forms the approximation as a CSR product, which
    torch has no bf16 kernel for; under bf16 autocast the dense product runs instead."""
    teacher = teacher_on("cpu")
    _, student, _, _ = student_of("sparsifiner", teacher, "cpu", reduce_n_factor=2)
    student.eval()
    images = torch.randn(2, 3, *teacher.preprocess.size)
    with torch.no_grad():
        fp32 = student(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = student(images)
    assert cosine(bf16, fp32) >= SELECTED["output"]


# ----------------------------------------------------------------------------- Sparsifiner's mask on CUDA


def assert_same_selection(got: torch.Tensor, want: torch.Tensor, approx: torch.Tensor, budget: int, prefix: int):
    """`got` (CUDA's additive mask) keeps what `want` (the CPU's) keeps in every row whose `budget`-th and next
    largest values differ; in a row tied at that boundary any of the tied keys may be kept, so there it must keep
    `budget` keys, none smaller than a key it drops."""
    kept_got, kept_want = got[:, :, prefix:] == 0, want[:, :, prefix:] == 0
    assert (got[:, :, :prefix] == 0).all() and (want[:, :, :prefix] == 0).all()
    n = approx.shape[-1]
    assert (kept_got.sum(-1) == min(budget, n)).all()
    if budget >= n:
        return
    ordered = approx.sort(dim=-1, descending=True).values
    tie = (ordered[..., budget - 1] - ordered[..., budget]).abs() <= 1e-6 * ordered[..., :1].abs().clamp_min(1)[..., 0]
    assert torch.equal(kept_got[~tie], kept_want[~tie])
    smallest_kept = approx.masked_fill(~kept_got, float("inf")).amin(-1)
    largest_dropped = approx.masked_fill(kept_got, float("-inf")).amax(-1)
    assert (smallest_kept >= largest_dropped - 1e-6).all()


@pytest.mark.gpu
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("budget", [1, 17, 40, 64])
def test_sparsifiner_selection_on_cuda_is_the_cpus(prefix, budget):
    """Exactly the same mask for rows without ties; a valid top-k, and the CPU's choice wherever the row is not
    tied at the budget, for the rows built with ties."""
    from students.sparsifiner.model import attention_bias, attention_mask

    g = torch.Generator().manual_seed(budget * 10 + prefix)
    # Every row a shuffle of 65 distinct values: no ties (uniform draws tie now and then).
    plain = torch.rand(2, 3, 65 - prefix, 65, generator=g).argsort(-1).float().add_(1).div_(65)
    cpu = attention_bias(plain, budget, prefix, torch.float32)  # the compiled kernel, where it builds
    assert torch.equal(attention_bias(plain.cuda(), budget, prefix, torch.float32).cpu(), cpu)
    assert torch.equal(attention_mask(plain.cuda(), budget, prefix).cpu(), attention_mask(plain, budget, prefix))
    tied = approximations(budget * 10 + prefix, prefix=prefix)  # all-zero, constant and few-valued rows
    assert_same_selection(attention_bias(tied.cuda(), budget, prefix, torch.float32).cpu(),
                          attention_bias(tied, budget, prefix, torch.float32), tied, budget, prefix)


@pytest.mark.gpu
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("budget", [1, 17, 64])
def test_sparsifiner_combination_and_selection_on_cuda_are_the_cpus(prefix, budget, float32_is_float32):
    """The approximation's top-k terms combined and selected: on a CPU in one pass by the kernel (the CSR
    regime), on CUDA as a dense product and torch.topk."""
    from students.sparsifiner import mask_kernel
    from students.sparsifiner.model import attention_bias, combine

    index, values, basis = combination_terms(budget + prefix, prefix=prefix)
    with torch.no_grad():
        approx = combine(index, values, basis)
        cpu = mask_kernel.combine_select_bias(index, values, basis, budget, prefix)
        if cpu is None:  # no compiled kernel here: torch's CPU path
            cpu = attention_bias(approx, budget, prefix, torch.float32)
        cuda = attention_bias(combine(index.cuda(), values.cuda(), basis.cuda()), budget, prefix, torch.float32)
    assert_same_selection(cuda.cpu(), cpu, approx, budget, prefix)


@pytest.mark.gpu
def test_a_sparsifiner_masks_and_output_on_cuda_match_the_cpus(float32_is_float32):
    teacher = teacher_on("cpu")
    _, student, _, _ = student_of("sparsifiner", teacher, "cpu")
    student.eval()
    images = torch.randn(4, 3, *teacher.preprocess.size)
    with torch.no_grad():
        cpu = student.forward_details(images)
        cpu_out = student(images)  # the fused kernel's path on the CPU
        student.cuda()
        cuda = student.forward_details(images.cuda())
        cuda_out = student(images.cuda())
    for a, b in zip(cuda.attn_masks, cpu.attn_masks):
        # The approximations differ by float rounding between the devices: a key at a near-tie may flip.
        assert (a.cpu() == b).float().mean() >= 0.999
    assert cosine(cuda.output.cpu(), cpu.output) >= 0.9999
    assert cosine(cuda_out.cpu(), cpu_out) >= 0.9999


# ----------------------------------------------------------------------------- cached targets on CUDA


@pytest.mark.gpu
def test_targets_cached_on_cuda_feed_a_cuda_run_that_never_runs_the_teacher(demo_data, tmp_path, monkeypatch):
    from bootstrap.stepper import TrainingForward
    from data.stream import build_train_loader
    from data.targets import read_manifest
    from teachers.base import Teacher

    recipe = write_recipe(tmp_path / "tiny.yaml", demo_data)
    spec = yaml.safe_load(recipe.read_text())
    spec["run"]["mixed_precision"] = "bf16"
    recipe.write_text(yaml.safe_dump(spec))
    embeds, steps = [], []
    embed, step = Teacher.embed, TrainingForward.forward
    monkeypatch.setattr(Teacher, "embed", lambda self, x: embeds.append(x.device.type) or embed(self, x))
    monkeypatch.setattr(TrainingForward, "forward", lambda self, x: steps.append(x.device.type) or step(self, x))

    folder = tmp_path / "targets"
    assert cache_here(recipe, folder, "--views", str(K)) == 0
    manifest = read_manifest(folder)
    assert manifest["complete"] and manifest["precision"] == "bf16"
    assert embeds and set(embeds) == {"cuda"}  # the caching pass embedded every view (and held-out image) on CUDA

    # The cached targets are the teacher's bf16 embeddings on CUDA of the views the loader replays.
    source, teacher = store_of(folder, recipe)
    transform = teacher.train_transform(**spec["data"]["augment"])
    loader = build_train_loader(spec["data"]["train"], transform, 6, 0, rank=0, world_size=1, targets=source.store)
    images, extras = next(iter(loader))
    teacher.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fresh = teacher.embed(images.cuda()).float().cpu()
    assert ((extras["target"] - fresh).norm(dim=1) / fresh.norm(dim=1)).max() <= 0.05

    embeds.clear()
    out = tmp_path / "run"
    assert run_here(recipe, out, f"data.targets={folder}") == 0
    # The start's check re-embeds a few cached views and held-out images with the teacher on the CPU (float32), which
    # accepts the GPU's bf16 targets; the student trains on CUDA and the loop never runs the teacher.
    assert embeds == ["cpu", "cpu"]
    assert steps and set(steps) == {"cuda"}
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["finished"] and summary["nonfinite_total"] == 0
    held = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "heldout/cosine" in line]
    assert held[-1]["heldout/cosine"] > held[0]["heldout/cosine"]
