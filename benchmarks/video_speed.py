"""Speed of a video student beside its teacher applied frame by frame, per clip.

    python3 benchmarks/video_speed.py                                   # ViT-B/16 at 8 and 32 frames
    python3 benchmarks/video_speed.py --frames 8 --batch 2 --threads 1 --clock cpu   # on a shared machine

One table: for each clip length, the teacher over frames (`teachers.frames.VideoTeacher`: every frame through
the image tower, the mean of the frame embeddings) and the video student (`bootstrap_student(teacher, ...,
video={"frames": T})`: the clip_base construction, 48 latent tokens + the class token, inflated to clips);
GFLOPs per clip (counted), clips/s, peak memory, and the student against the teacher.

- Models: open_clip `--clip-model` (default ViT-B-16-quickgelu, OpenAI CLIP ViT-B/16's architecture) with
  random weights, and its video student; both at the teacher's 224 px. The student is built once and runs
  clips of any length (its frames are metadata).
- clips/s: teacher and student timed interleaved (teacher, student, student, teacher, ...) so that load from
  other processes on a shared machine hits both alike; `--batch` clips per forward, the median of `--iters`
  timed forwards after `--warmup`, under `torch.inference_mode()`. `--clock cpu` times this process's CPU time.
- GFLOPs: `eval.cost.count_flops` on one clip (2 per multiply-add; matmuls, convolutions, attention).
- Peak memory: `eval.cost.peak_memory` over the last warm-up forward (activations; weights are listed apart).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval.cost import count_flops, count_params  # noqa: E402  (after the sys.path lines above)

STUDENT = dict(tokens=49, focus_width=384, focus_repeats=4, num_points=16, conv_dim=64)  # recipes/clip_base.yaml


def build(clip_model: str, tokens: int):
    from students import bootstrap_student
    from teachers import create_teacher
    from teachers.frames import VideoTeacher

    logging.getLogger().setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn, on purpose
        teacher = create_teacher({"kind": "openclip", "model": clip_model, "pretrained": None})
    options = {**STUDENT, "tokens": tokens}
    if teacher.width != 768:  # another tower: the construction's defaults for it
        options = {"tokens": tokens}
    student, _ = bootstrap_student(teacher, **options, video={"frames": 8})
    return VideoTeacher(teacher).eval(), student.eval()


def main(argv: list[str] | None = None) -> int:
    from student_speed import time_pair

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-model", default="ViT-B-16-quickgelu", help="open_clip tower (default ViT-B-16-quickgelu)")
    parser.add_argument("--tokens", type=int, default=49, help="student tokens, class token included (default 49)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32], help="clip lengths (default 8 32)")
    parser.add_argument("--batch", type=int, default=1, help="clips per forward (default 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time elapsed time (wall) or this process's CPU time (cpu: for shared machines)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    teacher, student = build(args.clip_model, args.tokens)
    teacher.to(device)
    student.to(device)
    size = teacher.preprocess.size
    weights = {"teacher": count_params(teacher.teacher.model.visual)["total"], "student": count_params(student)["total"]}
    rows = []
    for frames in args.frames:
        one = torch.randn(1, frames, 3, *size, device=device)
        with torch.no_grad():
            gflops = {"teacher": count_flops(teacher.embed, one) / 1e9, "student": count_flops(student, one) / 1e9}
        x = torch.randn(args.batch, frames, 3, *size, device=device)
        cells = time_pair({"teacher": teacher.embed, "student": student}, x, "fp32", device, args.warmup,
                          args.iters, cell_seconds=600.0, clock=clock)
        t, s = cells["teacher"], cells["student"]
        tokens_t = f"{teacher.num_prefix_tokens + teacher.num_patches} x {frames}"
        tokens_s = f"{student.forward_tokens(one[:, :1]).shape[1]} per clip"
        rows.append(f"| {frames} | teacher over frames | {tokens_t} | {gflops['teacher']:.1f} | 1.0x | {t.img_s:.3f} | "
                    f"1.0x | {t.peak_mib:.0f} |")
        rows.append(f"| {frames} | video student | {tokens_s} | {gflops['student']:.1f} | "
                    f"{gflops['teacher'] / gflops['student']:.1f}x | {s.img_s:.3f} | {s.img_s / t.img_s:.1f}x | "
                    f"{s.peak_mib:.0f} |")
    print(f"{args.clip_model} at {size[0]} px, random weights; batch {args.batch} clip(s); {args.clock} clock; "
          f"{torch.get_num_threads()} thread(s); {args.device}\n")
    print("| frames | model | tokens | GFLOPs per clip | FLOPs ÷ | clips/s | speed × | peak MiB |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(f"\nparameters: teacher image tower {weights['teacher'] / 1e6:.1f}M, student {weights['student'] / 1e6:.1f}M; "
          f"teacher and student timed interleaved ({args.iters} forwards each, median); peak MiB: activations of one "
          f"forward. torch {torch.__version__}, {platform.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
