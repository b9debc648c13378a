"""Inference speed of the released bootstrapped SparseFormers beside their ViT teachers.

    python3 benchmarks/student_speed.py                       # the default table (~10-15 min on 2 idle cores)
    python3 benchmarks/student_speed.py --models clip_base --batch-sizes 8 --dtypes fp32
    python3 benchmarks/student_speed.py --device cuda
    python3 benchmarks/student_speed.py --threads 1 --clock cpu          # on a machine shared with other jobs

One table, teacher and student side by side: parameters, GFLOPs per image,
img/s per batch size, peak memory, in fp32 and bf16 autocast, the student's
speed relative to its teacher, and bf16's speed and cosine relative to fp32.

Pairs (random weights; nothing is downloaded):
  clip_base     open_clip ViT-B-16-quickgelu (encode_image)  vs  sparseformer_btsp_openai_clip_base   at 224
  clip_large    open_clip ViT-L-14-quickgelu (encode_image)  vs  sparseformer_btsp_openai_clip_large  at 224
  augreg_base   timm vit_base_patch16_224                    vs  sparseformer_btsp_augreg_base        at 224
  augreg_large  timm vit_large_patch16_384                   vs  sparseformer_btsp_augreg_large       at 384
  siglip_base   timm vit_base_patch16_siglip_224 (MAP head)    vs  its bootstrap_student (49 tokens)   at 224
  siglip_so400m timm vit_so400m_patch14_siglip_384 (MAP head)  vs  its bootstrap_student (182 tokens)  at 384
  pe_core_large timm vit_pe_core_large_patch14_336 (RoPE, MAP) vs  its bootstrap_student (144 + cls)    at 336
  dinov3_base   timm vit_base_patch16_dinov3 (RoPE, 4 regs)    vs  its bootstrap_student (63 + cls)     at 256
A student always runs at its teacher's resolution. Beside the CLIP ViT-B/16 and ViT-L/14 students (49 and 64
tokens), the teacher itself at that token budget, untrained (`eval.baselines.budget`): at a lower resolution
(112 px: 7 x 7 patches of 16, or 8 x 8 of 14), with its patch embedding resampled to a larger patch (32 px: 7 x 7;
28 px: 8 x 8), and keeping that many of its patch tokens at random; each is timed interleaved with the teacher and
the student (`--no-budget` leaves them out). The SigLIP towers are open_clip's ViT-B-16-SigLIP and
ViT-SO400M-14-SigLIP-384 image towers (the same timm models); their students are built by
`students.bootstrap_student` from the random teacher (no class token, the MAP head inherited). The rotary
pairs are the recipes' (`recipes/pe_core_large.yaml`: open_clip PE-Core-L-14-336's image tower with its
projection, which is this timm model with its head; `recipes/dinov3_base.yaml`), their students with the
recipes' token counts and rotary blocks.

Sparsifiner rows (a second table; random weights, students built by `students.sparsify`, keep 0.25
and 0.1, fp32): `sparsifiner_vitb16` (timm vit_base_patch16_224, 197 tokens) and `sparsifiner_dinov2`
(timm vit_base_patch14_dinov2 at 518 px, 1370 tokens), each beside its dense teacher, timed interleaved,
with the attention multiply-adds per image counted two ways (`students.sparsifiner.cost`: executed, and under
the mask as the paper counts them, predictor included). On CPU the 518 px pair runs batch <= 8 unless --full.

How things are measured (also printed under the table):
- img/s: teacher and student are timed *interleaved* (teacher, student,
  student, teacher, ...) so that load from other processes on a shared
  machine hits both alike; each figure is batch / median seconds per forward,
  after `--warmup` untimed forwards, under `torch.inference_mode()` in eval mode.
  A cell runs `--iters` timed forwards per model (at least 3), fewer at large
  batches (iters * 8 / batch, at least 3), and stops early, after 3, once it
  has spent `--cell-seconds`. `--clock cpu` times this process's CPU time
  instead of elapsed time (for a machine shared with other jobs; use it with
  `--threads 1`).
- GFLOPs: `eval.cost.count_flops` (`torch.utils.flop_counter.FlopCounterMode`)
  on one 224/384 image in fp32 (2 FLOPs per multiply-add; matmuls,
  convolutions and attention only, as that counter does). Counted with grad
  enabled and the `nn.MultiheadAttention` fast path off, because open_clip's
  fused inference path escapes the counter, and with the CPU flash-attention
  kernel registered (the counter does not know it). Teacher counts are checked
  against the analytic ViT count.
- Peak memory: `eval.cost.peak_memory`. On CUDA,
  `torch.cuda.max_memory_allocated()` over one forward minus what was
  allocated before. On CPU, the growth of the process's peak
  resident set (Linux VmHWM, reset through /proc/self/clear_refs) over the
  last warm-up forward, with the heap trimmed first (malloc_trim) so that
  freed tensors go back to the OS rather than hiding the peak. It includes
  allocator and library workspace, so read it as +-a few MiB.
- bf16: `torch.autocast(device, torch.bfloat16)`; the cosine is the smallest
  per-image cosine between the bf16 and fp32 outputs on the same batch.
  On a CPU without native bf16 (AVX512-BF16 or AMX) autocast still runs, but
  emulated and slow; the notes say so.
- `--compile` adds rows for `torch.compile`d teacher and student (opt-in;
  eager rows are always there, and the targets are eager).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.cost import count_flops, peak_memory  # noqa: E402  (after the sys.path line above)
from eval.features import autocast_context  # noqa: E402


# --------------------------------------------------------------------------
# The pairs
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    key: str
    teacher_lib: str  # "open_clip" or "timm"
    teacher: str
    student: str
    size: int
    large: bool  # on CPU, batches above 8 and emulated bf16 are opt-in (--full) for these
    bootstrapped: bool = False  # the student is `bootstrap_student(teacher)`, not a released name
    tokens: int | None = None  # the bootstrapped student's tokens (with its class token); None: the default
    budget: int = 0  # the teacher at this many patch tokens beside the student (the student's count); 0: not


# Sparsifiner pairs: key -> (timm teacher, its kwargs, resolution); students at these keep rates.
SPARSIFINER_PAIRS = {
    "sparsifiner_vitb16": ("vit_base_patch16_224", {}, 224),
    "sparsifiner_dinov2": ("vit_base_patch14_dinov2", {"img_size": 518}, 518),
}
SPARSIFINER_KEEP = (0.25, 0.1)

PAIRS = [
    Pair("clip_base", "open_clip", "ViT-B-16-quickgelu", "sparseformer_btsp_openai_clip_base", 224, False, budget=49),
    Pair("clip_large", "open_clip", "ViT-L-14-quickgelu", "sparseformer_btsp_openai_clip_large", 224, True,
         budget=64),
    Pair("augreg_base", "timm", "vit_base_patch16_224", "sparseformer_btsp_augreg_base", 224, False),
    Pair("augreg_large", "timm", "vit_large_patch16_384", "sparseformer_btsp_augreg_large", 384, True),
    Pair("siglip_base", "timm", "vit_base_patch16_siglip_224", "sparseformer from vit_base_patch16_siglip_224",
         224, False, bootstrapped=True),
    Pair("siglip_so400m", "timm", "vit_so400m_patch14_siglip_384", "sparseformer from vit_so400m_patch14_siglip_384",
         384, True, bootstrapped=True),
    Pair("pe_core_large", "timm", "vit_pe_core_large_patch14_336", "sparseformer from vit_pe_core_large_patch14_336",
         336, True, bootstrapped=True, tokens=145),
    Pair("dinov3_base", "timm", "vit_base_patch16_dinov3", "sparseformer from vit_base_patch16_dinov3", 256, False,
         bootstrapped=True, tokens=64),
]


class EncodeImage(nn.Module):
    """open_clip's `encode_image` as a module (the CLIP model's image features, unnormalised)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.visual = clip.visual  # encode_image(x) is visual(x); the text tower is not needed
        self.__dict__["clip"] = clip  # the whole CLIP, unregistered (not counted), for the budget baselines

    def forward(self, x):
        return self.visual(x)


def build_teacher(pair: Pair) -> nn.Module:
    if pair.teacher_lib == "open_clip":
        import logging

        import open_clip

        logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": intended
        clip = open_clip.create_model(pair.teacher)
        assert clip.visual.image_size[0] == pair.size
        model = EncodeImage(clip)
    else:
        import timm

        model = timm.create_model(pair.teacher)
        assert model.patch_embed.img_size[0] == pair.size
    return model.eval()


def build_student(pair: Pair, teacher: nn.Module) -> nn.Module:
    import students

    if pair.bootstrapped:
        from teachers.eva import is_eva
        from teachers.timm_vit import TimmEvaTeacher, TimmTeacher

        from students import bootstrap_student

        kind = TimmEvaTeacher if is_eva(teacher) else TimmTeacher
        wrapped = kind(teacher, name=pair.teacher, spec={"kind": "timm", "model": pair.teacher})
        return bootstrap_student(wrapped, **({} if pair.tokens is None else {"tokens": pair.tokens}))[0].eval()
    return students.create_model(pair.student).eval()


def build_budget_baselines(pair: Pair, teacher: nn.Module) -> dict[str, nn.Module]:
    """The teacher at the pair's token budget, untrained (`eval.baselines.budget`), by name; {} without a budget."""
    if not pair.budget:
        return {}
    from eval.baselines.budget import budget_baselines
    from teachers.openclip import OpenClipTeacher

    clip = teacher.clip if isinstance(teacher, EncodeImage) else None
    if clip is None:
        raise SystemExit(f"{pair.key}: the budget baselines are built for open_clip teachers here")
    wrapped = OpenClipTeacher(clip, name=pair.teacher, spec={"kind": "openclip", "model": pair.teacher,
                                                            "pretrained": None}, tokenizer_name=pair.teacher)
    return {m.name: m.eval() for m in budget_baselines(wrapped, [pair.budget])}


def analytic_vit_gflops(model: nn.Module, size: int) -> float:
    """Matmul/conv FLOPs of a ViT (2 per multiply-add), for checking the counter: the patch embedding,
    per block qkv, proj, QKᵀ, AV and the MLP, and the head (a projection/classifier, or a MAP head; an Eva's
    MAP head reads the prefix tokens too). Rotary embeddings are elementwise: not counted, as by the counter."""
    if isinstance(model, EncodeImage):
        v = model.visual
        patch, width = v.conv1.kernel_size[0], v.conv1.out_channels
        depth, out = len(v.transformer.resblocks), v.proj.shape[1]
        hidden, prefix, pool = v.transformer.resblocks[0].mlp.c_fc.out_features, 1, None
    else:
        patch, width = model.patch_embed.proj.kernel_size[0], model.embed_dim
        depth, out = len(model.blocks), model.num_classes
        hidden, prefix, pool = model.blocks[0].mlp.fc1.out_features, model.num_prefix_tokens, model.attn_pool
    n = (size // patch) ** 2
    tokens = n + prefix
    macs = n * 3 * patch * patch * width  # patch embedding
    macs += depth * (tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width)
    if pool is not None:  # MAP: the latent's q, every patch's k and v, one query's QKᵀ and AV, proj, MLP
        from teachers.eva import is_eva

        latent, read = pool.latent_len, tokens if is_eva(model) else n
        macs += latent * width * width + read * 2 * width * width + 2 * latent * read * width
        macs += latent * (width * width + 2 * width * pool.mlp.fc1.out_features)
    macs += width * out
    return 2 * macs / 1e9


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------
def cpu_supports_bf16() -> tuple[bool, str]:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX), and what was found."""
    flags = set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    mkldnn = torch.backends.mkldnn.is_available()
    with contextlib.suppress(Exception):
        mkldnn = mkldnn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if native and mkldnn:
        return True, f"native bf16 ({', '.join(native)})"
    cap = torch.backends.cpu.get_cpu_capability()
    return False, f"no native bf16 on this CPU (capability {cap}; no avx512_bf16/amx_bf16): bf16 is emulated"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}  # --dtypes name -> autocast dtype (None: no autocast)


def autocast(device: torch.device, dtype: str):
    return autocast_context(device, AUTOCAST[dtype])


@dataclass
class Cell:
    img_s: float = float("nan")
    seconds: list = field(default_factory=list)
    peak_mib: float = float("nan")


def time_pair(models: dict, x: torch.Tensor, dtype: str, device: torch.device, warmup: int, iters: int,
              cell_seconds: float, clock=time.perf_counter) -> dict[str, Cell]:
    """Interleaved timing of the models in `models` (name -> callable) on batch `x`."""
    names = list(models)
    cells = {n: Cell() for n in names}
    with torch.inference_mode(), autocast(device, dtype):
        for n in names:
            for i in range(warmup):
                if i == warmup - 1:  # the last warm-up forward measures memory
                    peak = peak_memory(models[n], x, AUTOCAST[dtype])
                    cells[n].peak_mib = float("nan") if peak is None else peak / 2**20
                else:
                    models[n](x)
            sync(device)
        start = time.perf_counter()
        for i in range(iters):
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                sync(device)
                t0 = clock()
                models[n](x)
                sync(device)
                cells[n].seconds.append(clock() - t0)
            if i + 1 >= 3 and time.perf_counter() - start > cell_seconds:
                break
    for n in names:
        cells[n].img_s = x.shape[0] / statistics.median(cells[n].seconds)
    return cells


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1).min().item()



# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-sizes", default="8,64", help="comma-separated (default 8,64)")
    p.add_argument("--models", default="all",
                   help="comma-separated pair keys (clip_base, clip_large, augreg_base, augreg_large, siglip_base, "
                        "siglip_so400m, pe_core_large, dinov3_base, sparsifiner_vitb16, sparsifiner_dinov2) or "
                        "teacher/student names; a name "
                        "selects its whole "
                        "pair (default all)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast); default both")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model and cell (default 2)")
    p.add_argument("--iters", type=int, default=10,
                   help="timed forwards per model at batch <= 8 (default 10); larger batches run iters*8/batch; "
                        "at least 3 always")
    p.add_argument("--cell-seconds", type=float, default=60.0,
                   help="stop a cell early (after 3 iterations) once it took this long (default 60)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default; what img/s means). cpu: this process's CPU time, for a machine "
                        "shared with other jobs; use it with --threads 1, where it equals wall time on an idle "
                        "machine (with more threads it also counts OpenMP spin-waiting)")
    p.add_argument("--full", action="store_true",
                   help="on CPU, also run the cells skipped by default for time: batches above 8 for the large pairs "
                        "(ViT-L/16 at 384, batch 64, takes minutes per forward on 2 cores) and, where the CPU has "
                        "no native bf16, bf16 for the large pairs and bf16 above batch 8 (emulated bf16 runs 3-6x "
                        "slower than fp32)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd teacher and student (opt-in)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--no-budget", action="store_true",
                   help="leave out the teacher at the students' token budgets (lower resolution, larger patch, "
                        "random tokens)")
    return p.parse_args(argv)


def select_pairs(spec: str) -> list[Pair]:
    if spec == "all":
        return list(PAIRS)
    chosen = []
    for name in [s.strip() for s in spec.split(",") if s.strip() and s.strip() not in SPARSIFINER_PAIRS]:
        match = [p for p in PAIRS if name in (p.key, p.teacher, p.student) or name + "-quickgelu" == p.teacher]
        if not match:
            known = ", ".join(f"{p.key} ({p.teacher} / {p.student})" for p in PAIRS)
            raise SystemExit(f"--models: unknown model or pair '{name}'. Known pairs: {known}")
        chosen += [p for p in match if p not in chosen]
    return chosen


def select_sparsifiner(spec: str) -> list[str]:
    if spec == "all":
        return list(SPARSIFINER_PAIRS)
    return [k for k in SPARSIFINER_PAIRS if k in [s.strip() for s in spec.split(",")]]


def sparsifiner_table(keys: list[str], args, device: torch.device, clock, batch_sizes: list[int]) -> list[str]:
    """Sparsifiner students (keep 0.25, 0.1) beside their dense timm teachers: img/s, attention MACs, memory."""
    import timm

    from students.sparsifiner.cost import attention_cost
    from students import sparsify
    from teachers.timm_vit import TimmTeacher

    head = ["pair", "model", "tokens", "keep"] + [f"img/s b{bs}" for bs in batch_sizes]
    head += [f"speed vs teacher b{bs}" for bs in batch_sizes]
    head += ["attn GMACs executed", "attn GMACs masked", "mask density"] + [f"peak MiB b{bs}" for bs in batch_sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        arch, kwargs, size = SPARSIFINER_PAIRS[key]
        print(f"[{key}] building {arch} and its Sparsifiners ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        vit = timm.create_model(arch, **kwargs).eval()
        teacher = TimmTeacher(vit, name=arch, spec={"kind": "timm", "model": arch, "pretrained": False})
        models = {"teacher": vit.to(device)}
        costs = {}
        for keep in SPARSIFINER_KEEP:
            student, _ = sparsify(teacher, keep_rate=keep)
            models[f"keep {keep}"] = student.eval().to(device)
            costs[f"keep {keep}"] = attention_cost(student)
        n = costs[f"keep {SPARSIFINER_KEEP[0]}"]
        dense = n.dense_macs * len(n.density) / 1e9
        cells = {}
        for bs in batch_sizes:
            if device.type == "cpu" and size > 224 and bs > 8 and not args.full:
                continue
            torch.manual_seed(0)
            x = torch.randn(bs, 3, size, size, device=device)
            iters = max(3, round(args.iters * 8 / bs)) if bs > 8 else max(3, args.iters)
            print(f"[{key}] fp32 batch {bs}: {iters} iters ...", file=sys.stderr, flush=True)
            cells[bs] = time_pair(models, x, "fp32", device, max(1, args.warmup), iters, args.cell_seconds, clock)
        tokens = (size // vit.patch_embed.patch_size[0]) ** 2 + vit.num_prefix_tokens
        for name in models:
            row = [key, f"timm:{arch} (dense)" if name == "teacher" else f"Sparsifiner {name}", str(tokens),
                   "1" if name == "teacher" else name.split()[1]]
            row += [fmt(cells[bs][name].img_s) if bs in cells else "-" for bs in batch_sizes]
            row += [(fmt(cells[bs][name].img_s / cells[bs]["teacher"].img_s) + "x") if bs in cells and
                    name != "teacher" else "-" for bs in batch_sizes]
            c = costs.get(name)
            row += [fmt(dense if c is None else c.executed_total / 1e9, 3),
                    fmt(dense if c is None else c.masked_total / 1e9, 3),
                    "1" if c is None else fmt(sum(c.density) / len(c.density), 3)]
            row += [fmt(cells[bs][name].peak_mib, 0) if bs in cells else "-" for bs in batch_sizes]
            lines.append("| " + " | ".join(row) + " |")
        del models
    return lines


def fmt(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            raise SystemExit(f"--dtypes: '{d}' is not fp32 or bf16")
    pairs = select_pairs(args.models)
    variants = ["eager"] + (["compiled"] if args.compile else [])
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu times CPU work only; use the default wall clock with --device cuda")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if device.type == "cpu":
        bf16_native, bf16_note = cpu_supports_bf16()
    else:
        bf16_native = torch.cuda.is_bf16_supported()
        bf16_note = "native bf16" if bf16_native else "this GPU lacks bf16"
    notes: list[str] = []

    def skipped(pair: Pair, dtype: str, bs: int) -> bool:
        """Cells left out of a default CPU run because they take many minutes (see --full)."""
        if device.type != "cpu" or args.full:
            return False
        slow_bf16 = dtype == "bf16" and not bf16_native and (pair.large or bs > 8)
        return (pair.large and bs > 8) or slow_bf16

    sparsifiner_keys = select_sparsifiner(args.models)
    if not pairs and not sparsifiner_keys:
        raise SystemExit(f"--models: nothing selected from '{args.models}'")
    rows = []  # one per (pair, model, variant, dtype)
    for pair in pairs:
        print(f"[{pair.key}] building {pair.teacher} and {pair.student} ...", file=sys.stderr, flush=True)
        teacher = build_teacher(pair)
        student = build_student(pair, teacher)
        baselines = {} if args.no_budget else build_budget_baselines(pair, teacher)
        models = {"teacher": teacher, "student": student, **baselines}
        # A baseline runs the teacher's own weights: its parameters are the teacher's.
        params = {m: sum(p.numel() for p in (teacher if m in baselines else mod).parameters()) / 1e6
                  for m, mod in models.items()}
        gflops = {m: float("nan") for m in models}
        if not args.no_flops:
            one = torch.randn(1, 3, pair.size, pair.size)  # one image, fp32, on the CPU
            gflops = {m: count_flops(mod, one) / 1e9 for m, mod in models.items()}
            expect = analytic_vit_gflops(teacher, pair.size)
            if abs(gflops["teacher"] - expect) > 0.005 * expect:
                notes.append(f"{pair.teacher}: counted {gflops['teacher']:.2f} GFLOPs but the analytic ViT count "
                             f"is {expect:.2f}")
        models = {m: mod.to(device) for m, mod in models.items()}
        for variant in variants:
            runs = models if variant == "eager" else {k: torch.compile(m) for k, m in models.items()}
            results = {}  # (dtype, bs) -> {name: Cell}
            cosines = {}  # role -> smallest per-image cosine(bf16 output, fp32 output)
            for dtype in dtypes:
                for bs in batch_sizes:
                    if skipped(pair, dtype, bs):
                        continue
                    torch.manual_seed(0)
                    x = torch.randn(bs, 3, pair.size, pair.size, device=device)
                    iters = max(3, round(args.iters * 8 / bs)) if bs > 8 else max(3, args.iters)
                    print(f"[{pair.key}] {variant} {dtype} batch {bs}: {iters} iters ...", file=sys.stderr,
                          flush=True)
                    results[(dtype, bs)] = time_pair(runs, x, dtype, device, max(1, args.warmup), iters,
                                                     args.cell_seconds, clock)
                    for n, c in results[(dtype, bs)].items():
                        print(f"    {n}: {c.img_s:.2f} img/s  ({len(c.seconds)} runs, "
                              f"min {min(c.seconds):.3f}s, median {statistics.median(c.seconds):.3f}s, "
                              f"max {max(c.seconds):.3f}s)", file=sys.stderr, flush=True)
            if "bf16" in dtypes and "fp32" in dtypes:
                # bf16 vs fp32 outputs on one batch of 8: for every model whose bf16 cells ran, and always for
                # the student (the cosine is part of its target; a student forward is cheap even emulated).
                torch.manual_seed(0)
                x = torch.randn(8, 3, pair.size, pair.size, device=device)
                for role, m in runs.items():
                    if role == "student" or any(("bf16", bs) in results for bs in batch_sizes):
                        with torch.inference_mode():
                            ref = m(x).float()
                            with autocast(device, "bf16"):
                                cosines[role] = min_cosine(m(x).float(), ref)
            for dtype in dtypes:
                for role in models:
                    name = {"teacher": f"{pair.teacher_lib}:{pair.teacher}", "student": pair.student}.get(
                        role, f"{pair.teacher_lib}:{pair.teacher}, {role.removeprefix('teacher ')} (untrained)")
                    row = dict(pair=pair.key, role=role, name=name + (" [compiled]" if variant == "compiled" else ""),
                               size=pair.size, params=params[role], gflops=gflops[role], dtype=dtype)
                    for bs in batch_sizes:
                        cell = results.get((dtype, bs), {}).get(role)
                        row[f"img_s_{bs}"] = cell.img_s if cell else float("nan")
                        row[f"mem_{bs}"] = cell.peak_mib if cell else float("nan")
                        if role != "teacher" and cell:
                            row[f"ratio_{bs}"] = cell.img_s / results[(dtype, bs)]["teacher"].img_s
                        if dtype == "bf16" and "fp32" in dtypes and cell and ("fp32", bs) in results:
                            row[f"bf16x_{bs}"] = cell.img_s / results[("fp32", bs)][role].img_s
                    if role != "teacher":
                        row["flop_ratio"] = gflops["teacher"] / gflops[role]
                    if dtype == "bf16" and role in cosines:
                        row["cos"] = cosines[role]
                    rows.append(row)
        del teacher, student, baselines, models, runs

    sparsifiner_lines = sparsifiner_table(sparsifiner_keys, args, device, clock, batch_sizes) \
        if sparsifiner_keys else []

    # ------------------------------------------------------------------ table
    head = ["pair", "model", "res", "params (M)", "GFLOPs/img", "dtype"]
    head += [f"img/s b{bs}" for bs in batch_sizes]
    head += [f"peak MiB b{bs}" for bs in batch_sizes]
    head += [f"speed vs teacher b{bs}" for bs in batch_sizes] + ["FLOPs vs teacher"]
    head += [f"bf16/fp32 b{bs}" for bs in batch_sizes] + ["cos(bf16, fp32)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pair"], r["name"], str(r["size"]), fmt(r["params"], 1), fmt(r["gflops"], 2), r["dtype"]]
        cells += [fmt(r[f"img_s_{bs}"], 2) for bs in batch_sizes]
        cells += [fmt(r[f"mem_{bs}"], 0) for bs in batch_sizes]
        cells += [fmt(r.get(f"ratio_{bs}", float("nan")), 2) + ("x" if f"ratio_{bs}" in r else "")
                  for bs in batch_sizes]
        cells += [fmt(r["flop_ratio"], 2) + "x" if not math.isnan(r.get("flop_ratio", math.nan)) else "-"]
        cells += [fmt(r.get(f"bf16x_{bs}", float("nan")), 2) + ("x" if f"bf16x_{bs}" in r else "")
                  for bs in batch_sizes]
        cells += [fmt(r["cos"], 5) if "cos" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        print("\n".join(lines))
    if sparsifiner_lines:
        print(("\n" if rows else "") + "\n".join(sparsifiner_lines))

    # ------------------------------------------------------------------ notes
    print()
    if device.type == "cpu":
        cpu = platform.processor() or "cpu"
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        print(f"- Machine: {cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}.")
    else:
        print(f"- Machine: {torch.cuda.get_device_name(device)}, torch {torch.__version__}.")
    if "bf16" in dtypes:
        print(f"- bf16: {bf16_note}." + ("" if bf16_native else " Its speed here says nothing about a bf16 CPU."))
    if any(skipped(p, d, bs) for p in pairs for d in dtypes for bs in batch_sizes):
        print("- '-': cells skipped by default on CPU for time (--full runs them): batch > 8 for the large pairs"
              + ("" if bf16_native else "; bf16 (emulated here) for the large pairs and above batch 8") + ".")
    large = [p for p in pairs if p.size != 224]
    if large:
        print(f"- {', '.join(p.key for p in large)}: the student runs at {', '.join(str(p.size) for p in large)}, "
              f"its teacher's resolution.")
    if args.clock == "cpu":
        print("- Clock: process CPU time per forward (--clock cpu), not elapsed time: the machine was shared.")
    if any(p.budget for p in pairs) and not args.no_budget:
        print("- Untrained budget rows: the teacher itself at the student's token count (eval.baselines.budget): "
              "'at N px' resizes the input inside the model (its position embedding interpolated), 'patch P' "
              "resamples the patch embedding (224 px in), 'random N' keeps N patch tokens per image; each adds "
              "the class token. Timed interleaved with the teacher and the student.")
    print("- speed vs teacher: student img/s / teacher img/s, same dtype and batch, timed interleaved. "
          "FLOPs vs teacher: teacher GFLOPs / student GFLOPs.")
    print("- GFLOPs: FlopCounterMode, 2 per multiply-add, matmul/conv/attention only; peak MiB: "
          + ("torch.cuda.max_memory_allocated growth." if device.type == "cuda" else
             "growth of peak RSS (VmHWM) over one forward."))
    if sparsifiner_lines:
        print("- Sparsifiner: random weights (teacher and predictors), fp32; attention GMACs per image, "
              "multiply-adds of QK^T and AV plus the predictor (students.sparsifiner.cost): executed = what runs "
              "(the fused kernel forms every logit), masked = the paper's count under the mask; mask density "
              "= kept (query, key) pairs, mean over blocks. `forward` updates only the class token in the "
              "last block (its head reads nothing else).")
    for n in notes:
        print(f"- WARNING: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
