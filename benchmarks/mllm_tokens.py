"""What a 64- or 49-token student saves a LLaVA-1.5-7B against CLIP ViT-L/14-336's 576 tokens.

    python3 benchmarks/mllm_tokens.py                          # counts the encoders (about a minute on 2 cores)
    python3 benchmarks/mllm_tokens.py --students 49 --prompt-tokens 8 --threads 1
    python3 benchmarks/mllm_tokens.py --clip-model ViT-B-16-quickgelu      # another open_clip tower

One table, one row per vision tower: the image tokens the language model reads, the encoder's
GFLOPs (counted), the projector's, the language model's prefill FLOPs and KV-cache bytes for one
image plus a `--prompt-tokens` prompt, and each against CLIP.

- Language model: LLaVA-1.5-7B's (llava-hf/llava-1.5-7b-hf `text_config`, i.e. Vicuna-7B v1.5 /
  Llama-2-7B): hidden 4096, 32 layers, 32 heads (32 key/value heads), SwiGLU intermediate 11008,
  vocabulary 32000. No weights: its FLOPs and bytes are analytic. Prefill of L tokens, 2 FLOPs per
  multiply-add, per layer: q, k, v, o projections 8*L*d^2; SwiGLU MLP 6*L*d*i; causal attention
  (QK^T and AV over the L(L+1)/2 query-key pairs a causal mask keeps) 4*d*L(L+1)/2; then the LM
  head for the last position only (generate computes only the logits it samples from): 2*d*V.
  Norms, rotary embeddings and softmax are not counted (as the counter below does not count them).
- KV cache: 2 (K, V) * layers * L * kv_heads * head_dim * 2 bytes (fp16/bf16), after prefill.
- Projector: LLaVA-1.5's mlp2x_gelu, Linear(vision width, 4096) -> GELU -> Linear(4096, 4096)
  on every image token: 2 * N * (c * 4096 + 4096^2).
- Encoders, counted by `eval.cost.count_flops` (torch's FlopCounterMode: matmuls, convolutions
  and attention) on one image with random weights: open_clip ViT-L-14-336-quickgelu (LLaVA-1.5's
  tower; its `forward_tokens` through all 24 blocks, as transformers' CLIPVisionModel runs them
  for `vision_feature_layer=-2`) and the students that `students.bootstrap_student`
  builds from it with `tokens=64` / `tokens=49` (the clip_large construction: 16 inherited
  blocks; its `forward_hidden_states`, what the transformers model runs), at the teacher's 336 px.
  The teacher's count is checked against the analytic ViT count.
- Image tokens: CLIP with LLaVA's 'default' selection (576 patch tokens, the class token
  dropped); the students with 'full' (class token kept: 64 / 49; 'default' would pass one fewer).

A second table, a video (`--video-frames`, default 32; 0 skips it) in a LLaVA-OneVision-7B-shaped model:
- Language model: Qwen2-7B's dimensions (llava-hf/llava-onevision-qwen2-7b-ov-hf `text_config`: hidden
  3584, 28 layers, 28 heads, 4 key/value heads, intermediate 18944, vocabulary 152064), analytic as above.
- Vision tower: SigLIP so400m-patch14-384 (open_clip ViT-SO400M-14-SigLIP-384, random weights), every frame
  through all its blocks, counted on one frame times the frames; LLaVA-OneVision pools each frame's 27x27
  patch tokens 2x2 to 14x14 = 196 (the pooling's FLOPs are not counted), so 196 x 32 = 6272 video tokens.
- Video students: `bootstrap_student(tower, tokens=..., video={frames, replicates})` (no class token, the
  tower's MAP head inherited), counted on the whole clip through `forward_hidden_states`; `forward_tokens`
  gives `tokens x replicates` tokens for the whole clip.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval.cost import count_flops  # noqa: E402  (after the sys.path lines above)

# llava-hf/llava-1.5-7b-hf, text_config (LlamaConfig) and projector.
LLAVA_15_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
CLIP_TOWER = "ViT-L-14-336-quickgelu"  # LLaVA-1.5's openai/clip-vit-large-patch14-336
KV_BYTES_PER_VALUE = 2  # fp16 / bf16 cache


def prefill_flops(seq: int, lm: dict = LLAVA_15_7B) -> int:
    """Analytic prefill FLOPs of `seq` tokens (see the module docstring)."""
    d, i, n = lm["hidden"], lm["intermediate"], lm["layers"]
    kv = d * lm["kv_heads"] // lm["heads"]
    projections = 2 * seq * d * (2 * d + 2 * kv)  # q and o: d x d; k and v: d x kv
    mlp = 6 * seq * d * i
    attention = 4 * d * seq * (seq + 1) // 2
    return n * (projections + mlp + attention) + 2 * d * lm["vocab"]


def kv_cache_bytes(seq: int, lm: dict = LLAVA_15_7B) -> int:
    head_dim = lm["hidden"] // lm["heads"]
    return 2 * lm["layers"] * seq * lm["kv_heads"] * head_dim * KV_BYTES_PER_VALUE


def projector_flops(tokens: int, vision_width: int, lm: dict = LLAVA_15_7B) -> int:
    d = lm["hidden"]
    return 2 * tokens * (vision_width * d + d * d)


def encoder_gflops(clip_model: str, student_tokens: list[int]) -> tuple[dict, list[str]]:
    """{name: (GFLOPs, vision width, image tokens to the LM, image size)} for CLIP and each student; notes."""
    from student_speed import EncodeImage, analytic_vit_gflops

    from students import bootstrap_student
    from teachers import create_teacher

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": intended
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn, on purpose
        teacher = create_teacher({"kind": "openclip", "model": clip_model, "pretrained": None})
    x = torch.randn(1, 3, *teacher.preprocess.size)
    size = teacher.preprocess.size[0]
    out, notes = {}, []
    with torch.no_grad():
        flops = count_flops(lambda im: teacher.forward_tokens(im, layer=teacher.depth), x)
    # The analytic count includes the projection head, which forward_tokens does not run.
    expect = analytic_vit_gflops(EncodeImage(teacher.model), size) - 2 * teacher.width * teacher.embed_dim / 1e9
    if abs(flops / 1e9 - expect) > 0.01 * expect:
        notes.append(f"{clip_model}: counted {flops / 1e9:.2f} GFLOPs but the analytic ViT count is {expect:.2f}")
    label = " (LLaVA-1.5)" if clip_model == CLIP_TOWER else ""
    out[f"CLIP {clip_model}{label}"] = (flops / 1e9, teacher.width, teacher.num_patches, size)
    for tokens in student_tokens:
        student, _ = bootstrap_student(teacher, tokens=tokens)
        student.eval()
        with torch.no_grad():
            flops = count_flops(student.forward_hidden_states, x)
        blocks = student.num_blocks
        out[f"student of it, {tokens} tokens ({blocks} blocks)"] = (flops / 1e9, student.embed_dim, tokens, size)
        del student
    return out, notes


# llava-hf/llava-onevision-qwen2-7b-ov-hf, text_config (Qwen2-7B), and its vision tower.
LLAVA_OV_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)
OV_TOWER = "ViT-SO400M-14-SigLIP-384"


def video_encoder_gflops(tower: str, frames: int, student_tokens: list[int], replicates: list[int]) -> dict:
    """{name: (GFLOPs, vision width, video tokens to the LM, image size)} for the tower over every frame (pooled
    2x2 per frame, as LLaVA-OneVision) and each video student of it."""
    from students import bootstrap_student
    from teachers import create_teacher

    logging.getLogger().setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = create_teacher({"kind": "openclip", "model": tower, "pretrained": None})
    size = teacher.preprocess.size[0]
    with torch.no_grad():
        per_frame = count_flops(lambda im: teacher.forward_tokens(im, layer=teacher.depth),
                                torch.randn(1, 3, size, size))
    pooled = math.ceil(teacher.grid_size[0] / 2) * math.ceil(teacher.grid_size[1] / 2)
    out = {f"{tower}, {pooled} tokens per frame (LLaVA-OneVision)": (per_frame * frames / 1e9, teacher.width,
                                                                     pooled * frames, size)}
    clip = torch.randn(1, frames, 3, size, size)
    for tokens in student_tokens:
        for r in replicates:
            student, _ = bootstrap_student(teacher, tokens=tokens, video={"frames": frames, "replicates": r})
            student.eval()
            with torch.no_grad():
                flops = count_flops(student.forward_hidden_states, clip)
                clip_tokens = student.forward_tokens(clip).shape[1]
            out[f"video student, {tokens} tokens x {r} over time"] = (flops / 1e9, student.embed_dim, clip_tokens,
                                                                       size)
            del student
    return out


def table(encoders: dict, prompt_tokens: int, lm: dict = LLAVA_15_7B, what: str = "image",
          versus: str = "CLIP") -> str:
    rows = []
    base = None
    for name, (enc, width, tokens, _) in encoders.items():
        seq = tokens + prompt_tokens
        proj = projector_flops(tokens, width, lm) / 1e9
        prefill = prefill_flops(seq, lm) / 1e9
        total = enc + proj + prefill
        kv = kv_cache_bytes(seq, lm) / 2**20
        if base is None:
            base = (prefill, total, kv)
        rows.append(f"| {name} | {tokens} | {seq} | {enc:.1f} | {proj:.1f} | {prefill:.0f} | {prefill / base[0]:.3f} | "
                    f"{total:.0f} | {total / base[1]:.3f} | {kv:.1f} | {kv / base[2]:.3f} |")
    head = (f"| vision tower | {what} tokens | sequence | encoder GFLOPs | projector GFLOPs | LM prefill GFLOPs | "
            f"vs {versus} | total GFLOPs | vs {versus} | KV cache MiB | vs {versus} |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    return head + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, nargs="+", default=[64, 49],
                        help="student token counts (class token included; default 64 49)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens beside the image (default 64)")
    parser.add_argument("--clip-model", default=CLIP_TOWER,
                        help=f"the open_clip CLIP tower and teacher (default {CLIP_TOWER}, LLaVA-1.5's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--video-frames", type=int, default=32, help="frames of the video table (default 32; 0: none)")
    parser.add_argument("--video-tower", default=OV_TOWER, help=f"its open_clip tower (default {OV_TOWER})")
    parser.add_argument("--video-students", type=int, nargs="+", default=[144],
                        help="video student token counts (default 144)")
    parser.add_argument("--video-replicates", type=int, nargs="+", default=[1, 4],
                        help="each video student's copies of its tokens over time (default 1 4)")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 0 or any(t < 2 for t in args.students):
        parser.error("--prompt-tokens must be >= 0 and every student needs >= 2 tokens (one latent + the class token)")
    if args.threads:
        torch.set_num_threads(args.threads)
    encoders, notes = encoder_gflops(args.clip_model, args.students)
    lm = LLAVA_15_7B
    print(f"LLaVA-1.5-7B-shaped language model (hidden {lm['hidden']}, {lm['layers']} layers, {lm['heads']} heads, "
          f"intermediate {lm['intermediate']}, vocab {lm['vocab']}): one image + a {args.prompt_tokens}-token prompt\n")
    print(table(encoders, args.prompt_tokens))
    size = next(iter(encoders.values()))[3]
    print(f"\nencoders: counted (eval.cost.count_flops, one {size} px image, random weights); "
          f"language model and projector: analytic; KV cache in fp16. torch {torch.__version__}, "
          f"{platform.machine()}")
    for note in notes:
        print("note:", note)
    if args.video_frames > 0:
        video = video_encoder_gflops(args.video_tower, args.video_frames, args.video_students, args.video_replicates)
        lm = LLAVA_OV_7B
        print(f"\nLLaVA-OneVision-7B-shaped language model (Qwen2-7B: hidden {lm['hidden']}, {lm['layers']} layers, "
              f"{lm['heads']} heads, {lm['kv_heads']} key/value heads, intermediate {lm['intermediate']}, vocab "
              f"{lm['vocab']}): one video of {args.video_frames} frames + a {args.prompt_tokens}-token prompt\n")
        print(table(video, args.prompt_tokens, lm, "video", "LLaVA-OV"))
        size = next(iter(video.values()))[3]
        print(f"\nencoders: counted (one {size} px frame times {args.video_frames} for the tower; the whole clip for "
              f"the students), random weights; language model and projector (mlp2x_gelu): analytic.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
