"""One GPU check: the tests that need CUDA, the bootstrapping step in bf16, and the loader, in one markdown table.

    bash benchmarks/gpu_check.sh                      # one CUDA GPU, under 8 minutes; writes ./gpu_check.md
    bash benchmarks/gpu_check.sh --dry-run            # the same code on a CPU at tiny sizes (CI runs it)
    bash benchmarks/gpu_check.sh --peak-tflops 900    # MFU against this peak instead of the table's

In order (the table's rows too):

1. ``pytest -m gpu tests``: the tests only CUDA can run (tests/test_gpu.py: bf16 autocast of both student
   families against float32, Sparsifiner's mask on CUDA against the CPU's, cached targets made and replayed on
   CUDA). Without CUDA they are skipped, and the row says so.
2. The loader: the run's training loader (`bootstrap.train`'s: the recipe's data.decode, the teacher's
   training transform) with 8 and 16 workers over ImageNet-sized JPEGs (`data_speed.imagenet_like_jpeg`:
   ImageNet-1k's sizes and file sizes; 512 distinct images repeated to 8192), images/s from the moment every
   worker has handed in its first batch to the end of the epoch; and batched nvJPEG decoding on the GPU with
   each view's crop and resize there (`data_speed.gpu_rate`, ``--gpu-decode``), one CPU thread feeding it.
3. For each construction (recipes/clip_base.yaml, clip_large.yaml; random teacher weights, nothing is
   downloaded), the run's own pieces in the run's order: the accelerator (`bootstrap.launch.launch`: the
   recipe's bf16), the teacher (`bootstrap.resolve.build_teacher`), the caching pass on the device
   (`bootstrap.cache_targets`, one view per image), the target sources (`bootstrap.target_source`: cached,
   checked against the teacher, and online), the student, its phase and the stepper (``bootstrap.train``'s
   ``_stepper``: the family's build, `bootstrap.stepper.Stepper` with its AdamW groups and schedule) and the
   batches (``bootstrap.train``'s ``_train_batches`` loader: one epoch over the 512 distinct JPEGs, decoded
   once and held in memory, so that the rows time the device, not the loader). Then `Stepper.step`, the run's
   optimizer step, is timed online (the teacher embeds each batch) and with cached targets (they come with
   the batch), eagerly and with the module the stepper trains under ``torch.compile`` (its forward and, by AOT
   autograd, its backward; the optimizer step stays eager; the first compiled step's time is in the note).
   FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one eager step (matmuls,
   convolutions and attention, forward and backward, the teacher's forward when online; 2 per multiply-add);
   MFU = FLOPs per step x steps/s / the GPU's peak dense bf16 FLOP/s (`PEAK_BF16_TFLOPS` by the GPU's name,
   or ``--peak-tflops``).

The table goes to stdout and to ``--out``; progress goes to stderr. The exit status is 1 when a CUDA test
failed, a step was skipped for a non-finite loss or the GPU decoding failed; 2 for input it cannot run with.

``--dry-run`` runs every step above with the same functions at tiny sizes on whatever device there is (a
CPU in CI): toy open_clip towers (3 blocks, 32 px) and students sized to them, 8 distinct JPEGs, batch 4, 1
and 2 loader workers, ``torch.compile`` with the ``aot_eager`` backend (dynamo's capture and AOT autograd
without Inductor's code generation, which takes minutes on two cores), the GPU decoding code on the CPU. Its
numbers mean nothing; its table has the real one's rows and columns.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # the project, and data_speed beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from data.errors import UserError  # noqa: E402

MODELS = {"clip_base": ROOT / "recipes" / "clip_base.yaml", "clip_large": ROOT / "recipes" / "clip_large.yaml"}
GPU_DECODERS = ("cuda", "torchcodec-cuda")  # data_speed's GPU decode paths

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets, by the words of
# torch.cuda.get_device_name(): the first entry whose words all appear in the name wins.
PEAK_BF16_TFLOPS = (
    (("GH200",), 989.5),
    (("H200", "NVL"), 835.5),
    (("H200",), 989.5),
    (("H100", "NVL"), 835.5),
    (("H100", "PCIE"), 756.5),
    (("H100",), 989.5),  # SXM
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("L40S",), 362.1),
    (("L4",), 121.0),
)

COLUMNS = ("check", "construction", "targets", "torch.compile", "batch", "steps/s", "images/s", "GFLOP/step",
           "MFU", "note")


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch: int  # per step, and the loader's batch
    warmup: int  # untimed steps first (the compiled ones compile in the first)
    steps: int  # timed steps
    workers: tuple[int, ...]  # loader workers to time
    unique: int  # distinct generated JPEGs (the steps' images; the loader's shards repeat them)
    loader_images: int  # images in the loader's shards
    backend: str  # torch.compile backend


FULL = Sizes(batch=128, warmup=3, steps=10, workers=(8, 16), unique=512, loader_images=8192, backend="inductor")
DRY = Sizes(batch=4, warmup=1, steps=1, workers=(1, 2), unique=8, loader_images=32, backend="aot_eager")

# The dry run's toy towers at 32 px (3 blocks: the student inherits two, as the constructions inherit two thirds), the
# larger construction's wider, and students sized to them.
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY = {
    "clip_base": ({"embed_dim": 32, "quick_gelu": True, "text_cfg": _TEXT,
                   "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8}},
                  {"tokens": 5, "focus_width": 32, "conv_dim": 16, "num_points": 4, "pg_inner_dim": 16,
                   "focus_repeats": 2}),
    "clip_large": ({"embed_dim": 48, "quick_gelu": True, "text_cfg": _TEXT,
                    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8}},
                   {"tokens": 6, "focus_width": 32, "conv_dim": 16, "num_points": 4, "pg_inner_dim": 16,
                    "focus_repeats": 2}),
}


class CheckError(UserError, ValueError):
    """Input the check cannot run with: one line naming the problem and the fix."""


_START = time.perf_counter()


def say(text: str) -> None:
    """A progress line on stderr, with the seconds since the start (stdout is the table's)."""
    print(f"[{time.perf_counter() - _START:5.0f} s] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- input


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same code at tiny sizes on this machine's device "
                   "(a CPU in CI); its numbers mean nothing")
    p.add_argument("--out", default=None, help="the markdown file (default: gpu_check.md, or gpu_check-dry-run.md, "
                   "in the current folder)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--batch-size", type=int, default=None, help=f"per step (default {FULL.batch}; dry run "
                   f"{DRY.batch})")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps per row (default {FULL.steps})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {FULL.warmup})")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="loader workers to time (default 8 16)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s for MFU "
                   "(default: PEAK_BF16_TFLOPS by the GPU's name)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run "
                   "aot_eager)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--no-tests", action="store_true", help="leave out pytest -m gpu")
    p.add_argument("--gpu-decode", choices=(*GPU_DECODERS, "none"), default=None,
                   help="the GPU decoding row's decoder (default cuda: torchvision's nvJPEG; a dry run runs its code "
                        "on the CPU)")
    return p.parse_args(argv)


def check_input(args: argparse.Namespace) -> None:
    """Raise `CheckError` for input the check cannot run with (before anything is built)."""
    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        raise CheckError("no CUDA GPU here (torch.cuda.is_available() is False): run it on a machine with one, or "
                         "add --dry-run to run the same code on this CPU at tiny sizes")
    unknown = [m for m in args.models.split(",") if m.strip() not in MODELS]
    if unknown or not args.models.strip():
        raise CheckError(f"unknown construction {(unknown or [''])[0]!r} in --models; choose from "
                         f"{', '.join(MODELS)}")
    if args.gpu_decode not in (None, "none"):
        from data_speed import unavailable

        why = unavailable(args.gpu_decode)
        if why:
            raise CheckError(f"--gpu-decode {args.gpu_decode} {why}, or leave --gpu-decode out"
                             + (" (a dry run times the same code on the CPU)" if not cuda else ""))
    for key in ("batch_size", "steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise CheckError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.warmup is not None and args.warmup < 1:
        raise CheckError(f"--warmup must be at least 1 (the first step of a compiled forward compiles it), got "
                         f"{args.warmup}")
    if args.workers is not None and min(args.workers) < 1:
        raise CheckError(f"--workers must be at least 1 each, got {args.workers}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise CheckError(f"--peak-tflops must be above 0 (the GPU's dense bf16 TFLOP/s), got {args.peak_tflops}")
    folder = out_path(args).parent
    if not folder.is_dir():
        raise CheckError(f"--out {out_path(args)}: the folder {folder} does not exist; create it or write elsewhere")


def out_path(args: argparse.Namespace) -> Path:
    return Path(args.out or ("gpu_check-dry-run.md" if args.dry_run else "gpu_check.md"))


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = DRY if args.dry_run else FULL
    batch, workers = args.batch_size or base.batch, tuple(args.workers or base.workers)
    # At least 4 batches of distinct images, and 4 batches per loader worker.
    return dataclasses.replace(
        base, batch=batch, steps=args.steps or base.steps, warmup=args.warmup or base.warmup, workers=workers,
        backend=args.compile_backend or base.backend, unique=max(base.unique, 4 * batch),
        loader_images=max(base.loader_images, 4 * batch * max(workers)))


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU: pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    words = set(re.findall(r"[A-Z0-9]+", name.upper()))
    for keys, tflops in PEAK_BF16_TFLOPS:
        if set(keys) <= words:
            return tflops, f"{' '.join(keys)} in the table"
    return None, f"{name} is not in the table: pass --peak-tflops (its dense bf16 tensor TFLOP/s)"


# ----------------------------------------------------------------------------- data


def make_shards(folder: Path, sizes: Sizes) -> tuple[Path, Path, dict]:
    """(the steps' shards of `sizes.unique` distinct ImageNet-sized JPEGs, the loader's shards of
    `sizes.loader_images` that repeat them, the JPEGs' statistics)."""
    from data.shards import ShardSink, iter_shard, resolve_shards, write_dataset_json
    from data_speed import make_jpeg_shards

    unique = folder / "unique"
    stats = make_jpeg_shards(unique, sizes.unique, seed=0, per_shard=max(1, sizes.unique // 8))
    raws = [raw for url in resolve_shards(str(unique)) for raw in iter_shard(url)]
    repeated = folder / "loader"
    repeated.mkdir()
    # Enough shards for every worker to read its own (a worker takes every n-th shard).
    per_shard = max(1, sizes.loader_images // (4 * max(sizes.workers)))
    with ShardSink(repeated, maxcount=per_shard) as sink:
        for i in range(sizes.loader_images):
            raw = raws[i % len(raws)]
            sink.write({"__key__": f"{i:08d}", "jpg": raw["jpg"], "cls": raw["cls"]})
        shards = sink.close()
    write_dataset_json(repeated, {"num_samples": sizes.loader_images, "shards": shards, "classnames": ["texture"]})
    return unique, repeated, stats


# ----------------------------------------------------------------------------- the steps


def recipe_for(name: str, train: Path, out: Path, sizes: Sizes, dry_run: bool):
    """The construction's recipe with random teacher weights and the generated shards (toy towers in a dry run)."""
    from bootstrap.config import load_recipe

    overrides = [f"data.train={train}", "data.val=null", f"data.batch_size={sizes.batch}", "teacher.pretrained=null",
                 f"run.output_dir={out}", "run.progress=false"]
    if dry_run:
        tower, student = TINY[name]
        overrides += [f"teacher.model=tiny-{name}", f"teacher.model_cfg={json.dumps(tower)}", "data.num_workers=0"]
        overrides += [f"student.{key}={value}" for key, value in student.items()]
    return load_recipe(MODELS[name], overrides)


def run_loader(recipe, teacher, targets, accelerator):
    """The run's training loader (``bootstrap.train._train_batches``: the recipe's data, the teacher's training
    transform, the cached targets' replay)."""
    from bootstrap.checkpoint import TrainState
    from bootstrap.train import _train_batches
    from students.run_folder import RunFolder

    view = recipe.train_transform(teacher)  # as bootstrap.train makes it (images, or clips of a video student)
    return _train_batches(recipe, view, targets, TrainState(), RunFolder(recipe.run.output_dir), accelerator,
                          False).loader


def in_memory(recipe, teacher, targets, accelerator) -> list:
    """One epoch of the run's loader (the steps' images), decoded once, with their cached targets when `targets`
    has them. A whole epoch: its workers then end at once. The loader sends uint8 views (data.decode=fast); they
    are normalised here once, as float batches the step moves to the device."""
    loader = run_loader(recipe, teacher, targets, accelerator)
    return [(loader.normalize(images), extras) for images, extras in loader]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(stepper, state, pool: list, targets, sizes: Sizes, device: torch.device) -> dict:
    """`sizes.warmup` untimed then `sizes.steps` timed optimizer steps of the run's stepper over `pool`."""
    batches = itertools.cycle(pool)
    skipped = 0

    def step() -> None:
        nonlocal skipped
        skipped += stepper.step(state, lambda: next(batches), targets).skipped

    t0 = time.perf_counter()
    step()  # a compiled forward compiles here
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(sizes.warmup - 1):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(sizes.steps):
        step()
    synchronize(device)
    return {"steps_per_s": sizes.steps / (time.perf_counter() - t0), "first_step_s": first, "skipped": skipped}


def count_flops(stepper, state, batch, targets) -> float:
    """FLOPs of one optimizer step, forward and backward (FlopCounterMode: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        stepper.step(state, lambda: batch, targets)
    return float(counter.get_total_flops())


def check_construction(name: str, folders: tuple[Path, Path], tmp: Path, sizes: Sizes, args, peak,
                       with_loader: bool) -> list[dict]:
    """The step rows of one construction (after the loader rows, `with_loader`)."""
    from bootstrap.cache_targets import cache_targets
    from bootstrap.checkpoint import TrainState
    from bootstrap.launch import launch
    from bootstrap.resolve import ResolvedRun, build_teacher
    from bootstrap.target_source import target_source
    from bootstrap.train import _stepper
    from students.run_folder import RunFolder

    unique, repeated = folders
    recipe = recipe_for(name, unique, tmp / name, sizes, args.dry_run)
    rows = []
    # The run's chatter (the caching pass, the stepper's summary) goes to stderr: stdout is the table's.
    with contextlib.redirect_stdout(sys.stderr):
        accelerator = launch(recipe)
        device = accelerator.device
        teacher = build_teacher(recipe)
        transform = teacher.train_transform(decode=recipe.data.decode, **recipe.data.augment)
        t0 = time.perf_counter()
        folder = tmp / f"targets-{name}"
        manifest = cache_targets(recipe, 1, folder, batch_size=sizes.batch, accelerator=accelerator, teacher=teacher,
                                 progress=False)
        caching_s = time.perf_counter() - t0
        cached_recipe = recipe.replace(data=dataclasses.replace(recipe.data, targets=str(folder)))
        with warnings.catch_warnings():  # the steps replay the one cached view of each image, knowingly
            warnings.filterwarnings("ignore", message=".*targets hold .* per image", category=RuntimeWarning)
            cached = target_source(cached_recipe, teacher, transform, accelerator, say=say)
        online = target_source(recipe, teacher, transform, accelerator, say=say)  # the teacher moves to the device
        if with_loader:
            rows += loader_rows(recipe, teacher, online, accelerator, repeated, sizes, args, device)
        stepper = _stepper(ResolvedRun(recipe, RunFolder(recipe.run.output_dir)), teacher, online, accelerator, say)
        state = TrainState()
        stepper.begin(state)
        pools = {"online": in_memory(recipe, teacher, online, accelerator),
                 "cached": in_memory(cached_recipe, teacher, cached, accelerator)}
        sources = {"online": online, "cached": cached}
        flops = {mode: count_flops(stepper, state, pools[mode][0], sources[mode]) for mode in pools}
        eager = stepper.model
        for compiled in [False] if args.no_compile else [False, True]:
            for mode in ("online", "cached"):
                say(f"{name}: {mode} steps{', compiled' if compiled else ''} ...")
                try:
                    if compiled and stepper.model is eager:
                        stepper.model = torch.compile(eager, backend=sizes.backend)
                    timing = time_steps(stepper, state, pools[mode], sources[mode], sizes, device)
                except Exception as exn:  # noqa: BLE001 - a compiler's failure is a finding: the table says it
                    if not compiled:
                        raise
                    rows.append(failed_row(name, mode, compiled, exn))
                    continue
                rows.append(step_row(name, mode, compiled, timing, flops[mode], sizes, peak, caching_s, manifest))
        del eager
    del stepper, pools, sources, online, cached, teacher
    accelerator.free_memory()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def step_row(name, mode, compiled, timing, flops, sizes, peak, caching_s, manifest) -> dict:
    steps_per_s = timing["steps_per_s"]
    notes = []
    if compiled:
        first = timing["first_step_s"]
        notes.append(f"first step {figure(first)} s")
        if mode == "online":
            notes[-1] += f" (compiles the training forward and backward, {sizes.backend})"
    if mode == "cached" and not compiled:
        notes.append(f"caching pass {figure(manifest['stats']['img_per_s'])} img/s" if manifest.get("stats")
                     else f"caching pass {figure(caching_s)} s")
    if timing["skipped"]:
        notes.append(f"{timing['skipped']} step(s) skipped: non-finite loss or gradient")
    return {"check": "bootstrapping step", "construction": name, "targets": mode, "torch.compile": "yes" if compiled
            else "no", "batch": sizes.batch, "steps/s": steps_per_s, "images/s": steps_per_s * sizes.batch,
            "GFLOP/step": flops / 1e9, "MFU": None if peak is None else flops * steps_per_s / (peak * 1e12),
            "note": "; ".join(notes), "failed": bool(timing["skipped"])}


def failed_row(name: str, mode: str | None, compiled: bool | None, exn: BaseException) -> dict:
    """A row saying what failed (the traceback goes to stderr)."""
    import traceback

    traceback.print_exception(exn, file=sys.stderr)
    what = " ".join(f"{type(exn).__name__}: {exn}".split())
    return {"check": "bootstrapping step", "construction": name, "targets": mode,
            "torch.compile": None if compiled is None else "yes" if compiled else "no",
            "note": f"failed: {what[:200]}", "failed": True}


# ----------------------------------------------------------------------------- the loader


def loader_rows(recipe, teacher, online, accelerator, folder: Path, sizes: Sizes, args, device) -> list[dict]:
    """Images/s of the run's training loader with each worker count, and of batched GPU decoding."""
    rows = []
    for workers in sizes.workers:
        r = recipe.replace(data=dataclasses.replace(recipe.data, train=str(folder), num_workers=workers))
        loader = run_loader(r, teacher, online, accelerator)
        batches = iter(loader)
        # Each worker makes whole batches of its own range of samples, and the loader hands them out in turn: once
        # the first `workers` batches are in, every worker has made one, and the time to the end of the epoch is
        # that of the other rounds (the workers' start is left out).
        first = min(workers, len(loader) - 1)
        for _ in range(first):
            next(batches)
        t0 = time.perf_counter()
        count = images = 0
        for batch, _ in batches:  # to the end of the epoch: the workers then end at once
            count, images = count + 1, images + batch.shape[0]
        rate = images / (time.perf_counter() - t0)
        say(f"loader, {workers} workers: {rate:.0f} images/s")
        rows.append({"check": f"loader, {workers} worker{'s' if workers > 1 else ''}", "construction": recipe.name,
                     "batch": sizes.batch, "steps/s": rate / sizes.batch, "images/s": rate,
                     "note": f"data.decode={recipe.data.decode}, ImageNet-sized JPEGs, the last {count} batches of "
                             f"{len(loader)}"})
    decoder = args.gpu_decode or "cuda"
    if decoder != "none":
        from data_speed import gpu_rate

        size = teacher.preprocess.size[0]
        try:
            rate = gpu_rate(folder, decoder, size, sizes.batch, train=True, device=device.type)
            note = f"batched decode_jpeg(device={device.type!r}), crop and resize there; one CPU thread feeds it"
        except RuntimeError as exn:  # e.g. a torchvision built without nvJPEG
            rate, note = None, f"failed: {' '.join(str(exn).split())[:160]}"
        rows.append({"check": f"GPU decode ({decoder})", "construction": recipe.name, "batch": sizes.batch,
                     "steps/s": None if rate is None else rate / sizes.batch, "images/s": rate, "note": note,
                     "failed": rate is None and device.type == "cuda"})
    return rows


# ----------------------------------------------------------------------------- the tests


def gpu_tests() -> dict:
    """``pytest -m gpu tests`` in a process of its own: its summary as a table row."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {word.rstrip("s") if word.startswith("error") else word: int(n)
              for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last)}
    failed = proc.returncode not in (0, 5) or bool(counts.get("failed") or counts.get("error"))
    if failed:
        say(proc.stdout[-6000:] + proc.stderr[-2000:])
    summary = ", ".join(f"{n} {word}" for word, n in counts.items()) or f"pytest exit status {proc.returncode}"
    if counts.get("skipped") and not torch.cuda.is_available():
        summary += " (no CUDA here)"
    return {"check": "pytest -m gpu", "note": f"{summary}; {seconds:.0f} s", "failed": bool(failed)}


# ----------------------------------------------------------------------------- the table


def figure(value: float) -> str:
    """A measured number as the table gives it: whole from 100 on, else three significant digits."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def cell(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None or value == "":
        return "-"
    if column == "MFU":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return figure(value)
    return str(value).replace("|", "/")


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row, c) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def header(device: torch.device, peak, peak_from: str, sizes: Sizes, args, stats: dict, seconds: float) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    kind = "dry run (tiny sizes: the numbers mean nothing)" if args.dry_run else "GPU check"
    peak_text = f"peak bf16 {peak:g} TFLOP/s ({peak_from})" if peak else f"MFU: {peak_from}"
    over = " (above the 8 minutes aimed at)" if not args.dry_run and seconds > 480 else ""
    return (f"{kind}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {where}, {peak_text}; torch "
            f"{torch.__version__}, bf16, batch {sizes.batch}, {sizes.steps} timed step{'s' if sizes.steps > 1 else ''} "
            f"after {sizes.warmup}; "
            f"JPEGs {stats['width']:.0f} x {stats['height']:.0f} px, {stats['kb']:.0f} KB on average; "
            f"{seconds / 60:.1f} min{over}")


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")  # its JPEG decoding
    try:
        check_input(args)
    except CheckError as exn:
        print(f"gpu_check: error: {exn}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    sizes = sizes_of(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_from = peak_tflops(device, args.peak_tflops)
    rows = [] if args.no_tests else [gpu_tests()]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        say(f"generating {sizes.unique} ImageNet-sized JPEGs ...")
        unique, repeated, stats = make_shards(Path(tmp), sizes)
        for i, name in enumerate(names):
            say(f"{name} ...")
            try:
                rows += check_construction(name, (unique, repeated), Path(tmp), sizes, args, peak, with_loader=i == 0)
            except Exception as exn:  # noqa: BLE001 - the other constructions still run, and the table says it
                rows.append(failed_row(name, None, None, exn))
    seconds = time.perf_counter() - start
    text = header(device, peak, peak_from, sizes, args, stats, seconds) + "\n\n" + table(rows) + "\n"
    from data.outputs import write_text

    out = out_path(args)
    write_text(out, text)
    print(text, end="")
    say(f"written to {out}")
    return 1 if any(row.get("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
