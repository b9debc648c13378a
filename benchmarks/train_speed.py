"""Training throughput of the bootstrapping step: teacher forward + student step, fed by the real loader; and of
the supervised step of the same student.

    python3 benchmarks/train_speed.py                                   # CPU: clip_base and clip_large, small batches
    python3 benchmarks/train_speed.py --device cuda --batch-size 128 --precision bf16 --steps 30
    python3 benchmarks/train_speed.py --models clip_base --num-workers 8 --json out.json
    python3 benchmarks/train_speed.py --models augreg_base --modes online,labels   # alignment beside labels

For each construction (the teacher and student of recipes/clip_base.yaml and
recipes/clip_large.yaml, random weights, nothing downloaded) it runs the training step of
`bootstrap.train` on one device:

    images = next(loader)                       data: decode + augment (WebDataset shards, DataLoader workers)
    target = teacher.embed(images)              teacher: frozen forward, no grad
    loss = alignment_loss(student(images), target); backward; clip; AdamW step
                                                student: forward, backward and optimizer step

and reports training img/s (end to end, per device) and the share of the step spent in
each of the three parts, twice: online (as above) and cached, where the targets come from
`bootstrap.cache_targets` (one view per image, float16) with the batch and the teacher does
not run (`data.targets`); the line `cached/online speed (CONSTRUCTION): X.XXx` compares the two.
The caching pass (over the same images) is reported beside the teacher's inference speed
(inference_mode, one batch, median of 3 forwards, as student_speed.py times it), and the
storage cost of a target shard (bytes per image per view, ImageNet-1k with K = 10).

With ``--modes ...,labels`` (constructions whose student has a classifier head: augreg_base) the same student
also takes the supervised step of recipes/augreg_base_finetune.yaml: the labelled batch through timm's
RandAugment and random erasing, Mixup/CutMix (timm's, a batch transform), cross-entropy with label
smoothing through the head, backward, clip, AdamW, and the EMA update (timm's ModelEmaV3); no teacher
forward. The student trains the same parameters in both steps (the bootstrapping policy, and its head), so
that the two differ by their objective alone; `labels/align speed (CONSTRUCTION): X.XXx` compares them.

The data part is the time the step waits for the loader (workers decode ahead, so it is
near 0 when they keep up). Times are medians over `--steps` timed
steps after `--warmup` untimed ones, with the device synchronised between parts; "compute
img/s" leaves the data wait out (what faster loading could reach).

The shards are synthetic JPEGs (smooth random images, ~`--image-size` px, written once into
a temporary folder; exactly the images the timed steps read, so the caching pass embeds each
once), decoded and augmented with the teacher's own training transform. `--device cuda
--precision bf16` runs the caching pass and the steps on the GPU under bf16 autocast.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"clip_base": ROOT / "recipes" / "clip_base.yaml", "clip_large": ROOT / "recipes" / "clip_large.yaml",
          "augreg_base": ROOT / "recipes" / "augreg_base.yaml"}
SUPERVISED = ROOT / "recipes" / "augreg_base_finetune.yaml"  # the supervised step's augmentation, mixing and EMA
NUM_CLASSES = 1000


def make_shards(out: Path, num: int, size: int, seed: int = 0) -> Path:
    """`num` smooth random JPEGs of about `size` px in WebDataset shards (with dataset.json), labelled with
    1000 classes (for the supervised step)."""
    from PIL import Image

    from data.shards import ShardSink, prepare_out_dir, write_dataset_json

    rng = np.random.default_rng(seed)
    out = prepare_out_dir(out, overwrite=True)  # ShardSink writes into an existing folder
    with ShardSink(out, maxcount=256) as sink:
        for i in range(num):
            low = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
            w, h = int(size * rng.uniform(1.0, 1.4)), int(size * rng.uniform(1.0, 1.2))
            image = Image.fromarray(low).resize((w, h), Image.BICUBIC)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": str(i % NUM_CLASSES).encode()})
        shards = sink.close()
    write_dataset_json(out, {"format": "webdataset", "created_by": "benchmarks/train_speed.py", "num_samples": num,
                             "shards": shards, "classnames": [f"class {c}" for c in range(NUM_CLASSES)]})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_forward(teacher, batch: int, device: torch.device, autocast, iters: int = 3) -> float:
    """Teacher inference img/s as student_speed.py times it: inference_mode, one batch, median of `iters`."""
    x = torch.randn(batch, 3, *teacher.preprocess.size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(iters + 1):
            sync(device)
            t0 = time.perf_counter()
            with autocast():
                teacher.embed(x)
            sync(device)
            if i:  # the first forward warms up
                times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def bench_model(name: str, shards: Path, args, device: torch.device) -> dict:
    """The training step of `name`, online (teacher forward every step) and from cached targets."""
    from accelerate import Accelerator

    from bootstrap.cache_targets import cache_targets
    from bootstrap.config import load_recipe
    from data.shards import resolve_shards
    from data.targets import open_targets
    from teachers import create_teacher

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision]
    recipe = load_recipe(MODELS[name], [f"data.train={shards}", "data.val=null", f"run.mixed_precision='{precision}'",
                                        f"data.num_workers={args.num_workers}"])
    spec = {**recipe.teacher, "pretrained": False}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = create_teacher(spec).to(device).eval()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    inference = _median_forward(teacher, args.batch_size, device, autocast)
    online = _timed_steps(name, recipe, teacher, shards, args, device, autocast, store=None)
    result = {**online, "caching": {"teacher_inference_img_per_s": inference}}
    if "cached" in args.modes:
        # The caching pass over exactly the images the timed steps read (one view each).
        targets_dir = shards.parent / f"targets-{name}"
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
        torch_threads = torch.get_num_threads()
        manifest = cache_targets(recipe, 1, targets_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                                 accelerator=accelerator, teacher=teacher, progress=False)
        torch.set_num_threads(torch_threads)
        store = open_targets(targets_dir, manifest, resolve_shards(str(shards)))
        cached = _timed_steps(name, recipe, teacher, shards, args, device, autocast, store=store)
        result.update(cached=cached, cached_over_online=cached["img_per_s"] / online["img_per_s"])
        result["caching"].update(img_per_s=manifest["stats"]["img_per_s"], bytes_per_view=manifest["bytes_per_view"],
                                 teacher_img_per_s=manifest["stats"]["teacher_img_per_s"])
    if "labels" in args.modes:
        if teacher.head_state_dict() is None or teacher.num_classes != NUM_CLASSES:
            print(f"  {name}: no supervised step (its student's head is not a {NUM_CLASSES}-class classifier)",
                  file=sys.stderr)
        else:
            labels = _timed_steps(name, recipe, teacher, shards, args, device, autocast, store=None,
                                  supervised=load_recipe(SUPERVISED, [f"data.train={shards}", f"student.init={shards}"]))
            result.update(labels=labels, labels_over_online=labels["img_per_s"] / online["img_per_s"])
    return result


def _timed_steps(name: str, recipe, teacher, shards: Path, args, device: torch.device, autocast, store,
                 supervised=None) -> dict:
    """The bootstrapping step (targets online, or from ``store``), or with ``supervised`` (a recipe) the supervised
    step of the same student."""
    from bootstrap.stepper import batch_mixer, optimizer_param_groups
    from data.stream import build_train_loader
    from students import bootstrap_student
    from students.losses import alignment_loss, label_loss

    torch.manual_seed(0)
    student, policy = bootstrap_student(teacher, **asdict(recipe.student))
    student.to(device).train()
    if supervised is not None or "labels" in args.modes:  # the same parameters in both steps: the head trains too
        student.proj.requires_grad_(True)
    pre_logits = teacher.target != "proj"
    o = recipe.optim
    optimizer = torch.optim.AdamW(optimizer_param_groups(student, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    view = teacher.train_transform(**(supervised or recipe).data.augment)
    mixer = ema = None
    if supervised is not None:
        from timm.utils import ModelEmaV3

        mixer, ema = batch_mixer(supervised.objective, NUM_CLASSES), ModelEmaV3(student, supervised.optim.ema_decay)
    loader = build_train_loader(str(shards), view, args.batch_size,
                                args.num_workers, epoch_samples=args.batch_size * (args.steps + args.warmup),
                                shuffle_buffer=100, seed=0, rank=0, world_size=1, targets=store)
    it = iter(loader)
    parts = {"data": [], "teacher": [], "student": []}
    mode = "labels" if supervised is not None else "online" if store is None else "cached"
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        images, extras = next(it)
        images = images.to(device, non_blocking=True)
        sync(device)
        t1 = time.perf_counter()
        if supervised is not None:  # no teacher: the labels, mixed with their images
            images, target = mixer(images, extras["cls"].to(device, non_blocking=True))
        elif store is None:
            with autocast():
                target = teacher.embed(images)
        else:
            target = extras["target"].to(device, non_blocking=True)
        sync(device)
        t2 = time.perf_counter()
        with autocast():
            pre, logits = student.forward_outputs(images)
        if supervised is not None:
            loss = label_loss(logits, target, supervised.objective.label_smoothing)
        else:
            loss = alignment_loss(pre if pre_logits else logits, target, recipe.loss.type)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(student)
        sync(device)
        t3 = time.perf_counter()
        if step >= args.warmup:
            for key, dt in (("data", t1 - t0), ("teacher", t2 - t1), ("student", t3 - t2)):
                parts[key].append(dt)
        print(f"  {name} {mode} step {step + 1}/{args.warmup + args.steps}: {args.batch_size / (t3 - t0):.1f} img/s",
              file=sys.stderr, flush=True)
    next(it, None)  # let the loader finish its epoch
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(med.values())
    # Tokens as the recipes count them: the latent tokens and the class token.
    return {
        "model": name, "teacher": recipe.teacher["model"], "student_tokens": student.num_tokens + 1,
        "image_size": list(teacher.preprocess.size), "batch_size": args.batch_size, "precision": args.precision,
        "device": str(device), "num_workers": args.num_workers, "targets": mode,
        "trainable_params_M": round(policy.num_trainable / 1e6, 1), "frozen_params_M": round(policy.num_frozen / 1e6, 1),
        "img_per_s": args.batch_size / total, "compute_img_per_s": args.batch_size / (med["teacher"] + med["student"]),
        "seconds_per_step": med,
        "share": {k: v / total for k, v in med.items()},
    }


def storage_cost(folder: Path, views: int = 10, dim: int = 768, samples: int = 1000) -> dict:
    """Bytes per image per view of a target shard as bootstrap.cache_targets writes it: `samples`
    images of K=`views` float16 targets of `dim` values with the views of clip_base's augmentation."""
    import webdataset as wds
    from PIL import Image

    from data.targets import encode_sample, view_generator
    from data.transforms import ReplayableTrainTransform

    transform = ReplayableTrainTransform(224, (0.5,) * 3, (0.5,) * 3, scale=(0.25, 1.0), hflip=0.5)
    image = Image.new("RGB", (500, 375))  # an ImageNet-sized image
    path = folder / "storage.tar"
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path), mtime=0, encoder=False) as writer:
        for i in range(samples):
            key = f"{i:09d}"
            params = [transform.draw(image, view_generator(0, key, v)) for v in range(views)]
            writer.write(encode_sample(key, params, rng.standard_normal((views, dim)).astype(np.float16)))
    per_image = path.stat().st_size / samples
    return {"views": views, "dim": dim, "bytes_per_image": per_image, "bytes_per_view": per_image / views,
            "imagenet_1k_GB": per_image * 1_281_167 / 1e9}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="clip_base,clip_large", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16" if cuda else "fp32")
    p.add_argument("--batch-size", type=int, default=128 if cuda else 4, help="per device")
    p.add_argument("--steps", type=int, default=20 if cuda else 3, help="timed steps")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1)
    p.add_argument("--num-workers", type=int, default=8 if cuda else 2)
    p.add_argument("--image-size", type=int, default=320, help="side of the synthetic source JPEGs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--modes", default="online,cached", type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                   help="online (teacher every step), cached (targets from bootstrap.cache_targets), labels (the "
                        "supervised step, where the student has a classifier head); comma-separated")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    unknown = [m for m in args.modes if m not in ("online", "cached", "labels")]
    if unknown or "online" not in args.modes:
        p.error(f"--modes takes online (always), cached and labels, got {','.join(args.modes)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        # Exactly the images the timed steps read, so the caching pass embeds each of them once.
        n = args.batch_size * (args.warmup + args.steps)
        shards = make_shards(Path(tmp) / "shards", n, args.image_size)
        for name in names:
            results.append(bench_model(name, shards, args, device))
        storage = storage_cost(Path(tmp)) if "cached" in args.modes else None
    env = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    print(f"\ntraining step, {env}, {args.precision}, batch {args.batch_size}, {args.num_workers} loader workers, "
          f"median of {args.steps} steps; cached: the targets of bootstrap.cache_targets (data.targets); labels: the "
          f"supervised step of the same student (no teacher; Mixup/CutMix, RandAugment, EMA)\n")
    print("| construction | teacher | student tokens | targets | img/s | compute img/s | teacher | student | data |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for row in (r, r.get("cached"), r.get("labels")):
            if row is None:
                continue
            s = row["share"]
            print(f"| {row['model']} | {row['teacher']} {row['image_size'][0]} px | {row['student_tokens']} | "
                  f"{row['targets']} | {row['img_per_s']:.2f} | {row['compute_img_per_s']:.2f} | "
                  f"{100 * s['teacher']:.0f}% | {100 * s['student']:.0f}% | {100 * s['data']:.0f}% |")
    print()
    for r in results:
        if "cached" in r:
            print(f"cached/online speed ({r['model']}): {r['cached_over_online']:.2f}x")
        if "labels" in r:
            print(f"labels/align speed ({r['model']}): {r['labels_over_online']:.2f}x")
    if "cached" in args.modes:
        print("\n| construction | caching pass img/s | teacher in the pass img/s | teacher inference img/s | "
              "pass/inference | bytes per image per view |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in results:
            c = r["caching"]
            print(f"| {r['model']} | {c['img_per_s']:.2f} | {c['teacher_img_per_s']:.2f} | "
                  f"{c['teacher_inference_img_per_s']:.2f} | {c['img_per_s'] / c['teacher_inference_img_per_s']:.2f}x | "
                  f"{c['bytes_per_view']:.0f} |")
    if storage is not None:
        print(f"\nstorage: {storage['bytes_per_view']:.0f} bytes per image per view (K={storage['views']} views of "
              f"a {storage['dim']}-d float16 target, view parameters and tar headers included); ImageNet-1k "
              f"(1,281,167 images): {storage['imagenet_1k_GB']:.1f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
