"""Token Merging (ToMe) on the CLIP teachers beside their bootstrapped SparseFormer students.

    python3 benchmarks/tome_speed.py                          # ViT-B/16 and ViT-L/14, batch 8, fp32
    python3 benchmarks/tome_speed.py --models clip_base --batch-sizes 1,8 --threads 1 --clock cpu
    python3 benchmarks/tome_speed.py --device cuda --batch-sizes 64,256

One table per run: for each teacher (open_clip ViT-B-16 / ViT-L-14, random weights; nothing
is downloaded) the teacher, its SparseFormer student (`students.create_model`) and the
teacher with ToMe (`eval.baselines.tome`) at the merging schedules whose counted FLOPs are
closest to `--flop-targets` times fewer than the teacher's (default 2 and 4): a constant r
(the paper's schedule) where one comes within 10% of the target, else ToMe's decreasing
schedule (`schedule(depth, r, inflect)` with inflect -0.5 or -1), else the same fraction of
the patch tokens merged in every block (`fraction_schedule`; ToMe's linear schedules stop
near 3x on ViT-B/16, because a block merges at most half its tokens). Columns: parameters,
GFLOPs per image, tokens entering the first block -> leaving the last, img/s and peak
memory per batch size, speed and FLOPs relative to the teacher.

Measured as `benchmarks/student_speed.py` measures (its `time_pair`: the models of a
teacher timed interleaved, batch / median seconds per forward, under
`torch.inference_mode()`; peak memory by `eval.cost.peak_memory` in the last warm-up
forward; GFLOPs by `eval.cost.count_flops` on one image, 2 per multiply-add).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval.baselines.tome import ToMe, fraction_schedule, plan, schedule  # noqa: E402
from eval.cost import count_flops  # noqa: E402
from student_speed import AUTOCAST, PAIRS, build_student, fmt, time_pair  # noqa: E402

CLIP_PAIRS = [p for p in PAIRS if p.teacher_lib == "open_clip"]  # ViT-B/16 and ViT-L/14
INFLECTS = (0.0, -0.5, -1.0)  # constant first (the paper's), then ToMe's decreasing schedules


def build_teacher(pair):
    from teachers import create_teacher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are the point here
        import logging

        logging.getLogger().setLevel(logging.ERROR)
        return create_teacher({"kind": "openclip", "model": pair.teacher, "pretrained": None})


def estimated_macs(teacher, rs: list[int]) -> float:
    """Multiply-adds of the blocks under a merging schedule (qkv, attention, proj before the merge; MLP
    after), to choose r before counting; the table shows counted FLOPs."""
    c, hidden, p = teacher.width, teacher.mlp_hidden_dim, teacher.num_prefix_tokens
    effective, counts = plan(rs, teacher.num_patches, teacher.depth, p)
    macs, t = 0.0, p + teacher.num_patches
    for leaving in counts:
        macs += 4 * t * c * c + 2 * t * t * c + 2 * leaving * c * hidden
        t = leaving
    return macs


def choose_schedules(teacher, targets: list[float]) -> list[tuple[float, str, list[int]]]:
    """For each FLOP target: (target, description, schedule) with the estimated ratio nearest to it, from
    the first family that comes within 10%: constant r, ToMe's decreasing schedules, a constant fraction."""
    base = estimated_macs(teacher, [0] * teacher.depth)
    families = []  # each: [(description, schedule, estimated ratio)]
    for inflect in INFLECTS:
        family = []
        for r in range(1, teacher.num_patches):
            rs = schedule(teacher.depth, r, inflect)
            if sum(rs) >= teacher.num_patches:
                break
            family.append((f"r={r}" if inflect == 0.0 else f"r={r}, inflect {inflect:g}", rs))
        families.append(family)
    fractions = [i / 100 for i in range(1, 51)]
    families.append([(f"{f:.2f} of the patch tokens per block",
                      fraction_schedule(teacher.num_patches, teacher.depth, f)) for f in fractions])
    families = [[(what, rs, base / estimated_macs(teacher, rs)) for what, rs in family] for family in families]
    chosen = []
    for target in targets:
        for family in families:
            best = min(family, key=lambda c: abs(c[2] - target))
            if abs(best[2] - target) <= 0.1 * target:
                break
        chosen.append((target, best[0], best[1]))
    return chosen


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="clip_base,clip_large", help="clip_base and/or clip_large (default both)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-sizes", default="8", help="comma-separated (default 8)")
    p.add_argument("--dtype", choices=tuple(AUTOCAST), default="fp32", help="fp32, or bf16 autocast")
    p.add_argument("--flop-targets", default="2,4", help="FLOP reductions to pick ToMe schedules for (default 2,4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model and cell (default 2)")
    p.add_argument("--iters", type=int, default=6, help="timed forwards per model and cell (default 6, at least 3)")
    p.add_argument("--cell-seconds", type=float, default=120.0, help="stop a cell early (after 3) past this long")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (a shared machine; use with --threads 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu times CPU work only; use the default wall clock with --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in {p.key for p in CLIP_PAIRS}]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(p.key for p in CLIP_PAIRS)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    targets = [float(t) for t in args.flop_targets.split(",")]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    rows = []
    for pair in [p for p in CLIP_PAIRS if p.key in keys]:
        print(f"[{pair.key}] building {pair.teacher} and {pair.student} ...", file=sys.stderr, flush=True)
        teacher, student = build_teacher(pair), build_student(pair, None)
        tower = teacher.model.visual
        models = {"teacher": (teacher.embed, tower, "-", f"{teacher.num_prefix_tokens + teacher.num_patches}"),
                  pair.student: (student, student, "-",
                                 f"{student.num_tokens} latent" + (" + cls" if student.config.has_cls_token else ""))}
        tomes = []
        for target, what, rs in choose_schedules(teacher, targets):
            tome = ToMe(teacher, rs)
            tomes.append(tome)
            models[f"ToMe ~{target:g}x fewer FLOPs"] = (
                tome.embed, tower, f"{what}: {','.join(map(str, tome.schedule))}",
                f"{teacher.num_prefix_tokens + teacher.num_patches} -> {tome.token_counts[-1]}")
        one = torch.randn(1, 3, pair.size, pair.size)
        gflops = {n: count_flops(fn, one) / 1e9 for n, (fn, *_) in models.items()}
        for module in (teacher, student, *tomes):
            module.to(device)
        cells = {}
        for bs in batch_sizes:
            torch.manual_seed(0)
            x = torch.randn(bs, 3, pair.size, pair.size, device=device)
            print(f"[{pair.key}] batch {bs} ...", file=sys.stderr, flush=True)
            cells[bs] = time_pair({n: m[0] for n, m in models.items()}, x, args.dtype, device, max(1, args.warmup),
                                  max(3, args.iters), args.cell_seconds, clock)
        for name, (fn, module, sched, tokens) in models.items():
            row = dict(pair=pair.key, model=name, schedule=sched, tokens=tokens,
                       params=sum(p.numel() for p in module.parameters()) / 1e6, gflops=gflops[name],
                       flop_ratio=gflops["teacher"] / gflops[name])
            for bs in batch_sizes:
                row[f"img_s_{bs}"] = cells[bs][name].img_s
                row[f"mem_{bs}"] = cells[bs][name].peak_mib
                row[f"speed_{bs}"] = cells[bs][name].img_s / cells[bs]["teacher"].img_s
            rows.append(row)
        del teacher, student, models

    head = ["pair", "model", "ToMe schedule (r per block)", "tokens", "params (M)", "GFLOPs/img", "FLOPs vs teacher"]
    head += [f"img/s b{bs}" for bs in batch_sizes] + [f"speed vs teacher b{bs}" for bs in batch_sizes]
    head += [f"peak MiB b{bs}" for bs in batch_sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pair"], r["model"], r["schedule"], r["tokens"], fmt(r["params"], 1), fmt(r["gflops"], 2),
                 fmt(r["flop_ratio"], 2) + "x"]
        cells += [fmt(r[f"img_s_{bs}"], 2) for bs in batch_sizes]
        cells += [fmt(r[f"speed_{bs}"], 2) + "x" for bs in batch_sizes]
        cells += [fmt(r[f"mem_{bs}"], 0) for bs in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads")
    print(f"- Machine: {where}, torch {torch.__version__}; {args.dtype}; clock: {args.clock}.")
    print("- ToMe schedule: what each block merges (after ToMe's cap of half the patch tokens a block gets); tokens: "
          "entering the first block -> leaving the last. Random weights: the speed, not the accuracy.")
    print("- FLOPs vs teacher: teacher GFLOPs / model GFLOPs (FlopCounterMode, 2 per multiply-add); speed vs teacher: "
          "img/s / teacher img/s, timed interleaved; peak MiB: "
          + ("torch.cuda.max_memory_allocated growth." if device.type == "cuda" else
             "growth of peak RSS (VmHWM) over one forward."))
    if any(math.isnan(r.get(f"mem_{bs}", 0.0)) for r in rows for bs in batch_sizes):
        print("- '-' peak memory: not measurable here.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
