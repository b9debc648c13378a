"""Compute the teacher's targets once: K augmented views per training image, stored beside the shards.

    python -m bootstrap.cache_targets RECIPE [key=value ...] --views K [--out DIR]
    accelerate launch -m bootstrap.cache_targets recipes/clip_base.yaml data.train=/data/in1k/train --views 10

then train with ``data.targets=DIR``: the run replays the stored views and never runs the
teacher (`bootstrap.target_source`). For every image of ``data.train`` it draws K views of the
recipe's training augmentation (``teacher.train_transform(**data.augment)``, crop box, flip and
colour-jitter parameters from a seed per image and view), embeds them with the teacher and
writes the parameters and targets into target shards parallel to the image shards (layout:
`data.targets`). The first ``data.heldout_samples`` images of ``data.val`` get their
un-augmented targets too (float32), for the held-out checks of the run.

The teacher runs at inference speed: batches of ``--batch-size`` views, ``torch.inference_mode``,
the recipe's precision (``run.mixed_precision``), on every process of ``accelerate launch``
(image shards are split between ranks; ``--num-workers`` DataLoader workers per rank decode and
augment). Each target shard is written to a temporary file and renamed when complete, so a
killed run leaves no half-written shard, and running the same command again continues with
the shards still missing. The manifest's ``complete`` flag is set last, with the SHA-256 of
every target shard; training refuses a folder without it. One process fills a folder at a
time (a lock file, ``.lock`` in it): a second command or run on the same folder waits, then
finds it complete. An image shard that turns out corrupt, or ends before the samples its
``dataset.json`` counts, is named; its unread samples are cached as skipped (training skips them).

Token targets (``--tokens``): also the teacher's final-normed tokens of every view
(``[L, width]`` each, for a token-level loss such as Sparsifiner's sparse phase; about 200x the
storage of the embedding). Attention maps (Sparsifiner's reconstruct phase) are not cached:
phases that need them run the teacher online.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: import the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bootstrap.config import Recipe, load_recipe
from data.digest import file_sha256
from data.errors import UserError
from data.targets import (CACHE_FIELDS, DTYPES, TARGET_SHARD, TargetsError, encode_sample, encode_skipped,
                          first_difference, make_manifest, read_manifest, save_heldout, view_generator,
                          weights_sha256, write_manifest)

LOCK = ".lock"  # the lock file in a targets folder
USAGE = "usage: python -m bootstrap.cache_targets RECIPE.yaml [section.key=value ...] --views K [--out DIR]"


# ----------------------------------------------------------------------------- what to cache


def run_manifest(recipe: Recipe, teacher, transform, views: int, dtype: str, tokens: bool) -> dict:
    """The manifest of ``recipe``'s targets (what a targets folder for it must record). For clips the augmentation
    records the clip sampling (``transform.settings()``) and the tokens are per frame."""
    from data.shards import resolve_shards, shard_sample_counts

    urls = resolve_shards(recipe.data.train, recipe.data.allow_pipe)
    counts = shard_sample_counts(urls)
    unknown = [u for u, c in zip(urls, counts) if c is None]
    if unknown:
        raise TargetsError(f"the sample count of shard {unknown[0]} is unknown; caching targets needs local shards "
                           f"with known counts (data.make_shards writes a dataset.json)")
    d = recipe.data
    frames = [recipe.media.frames] if recipe.media.video else []
    return make_manifest(
        teacher_spec=recipe.teacher, weights_sha256=weights_sha256(teacher), augment=transform.settings(),
        train_urls=urls, train_counts=counts, views=views, dtype=dtype, target_shape=[teacher.embed_dim],
        tokens_shape=[*frames, teacher.num_prefix_tokens + teacher.num_patches, teacher.width] if tokens else None,
        seed=recipe.run.seed, precision=recipe.run.mixed_precision, max_pixels=d.max_pixels,
        heldout=None if d.val is None else {"val": d.val if isinstance(d.val, str) else list(d.val),
                                            "samples": d.heldout_samples})


def final_tokens(teacher, images: torch.Tensor) -> torch.Tensor:
    """The teacher's final-normed tokens ``[B, L, width]`` (its own modules, block by block); of clips, per frame
    ``[B, T, L, width]`` (a teacher over frames, `teachers.frames`)."""
    if images.ndim == 5:
        return teacher.final_tokens(images)
    tokens = teacher.embed_tokens(images)
    for i in range(teacher.depth):
        tokens = teacher.run_block(i, tokens)
    return teacher._final_norm()(tokens)


# ----------------------------------------------------------------------------- views, in workers


class _Views(torch.utils.data.IterableDataset):
    """Chunks of K views per image, whole shards per worker, in shard order.

    Yields ``{"shard", "entries": [(key, views | None, error | None)], "images", "last", "lost"}``;
    a shard's last chunk has ``last=True`` and, when the shard broke off or ended before its
    counted samples, ``lost=(samples, error)``: those samples get skipped entries. Each worker
    takes every n-th of the given shards.
    """

    def __init__(self, urls: list[str], shards: list[int], transform, views: int, seed: int, chunk: int,
                 counts: list[int], max_pixels: int | None, media):
        super().__init__()
        self.urls, self.shards, self.transform = urls, shards, transform
        self.views, self.seed, self.chunk = views, seed, chunk
        self.counts, self.max_pixels, self.media = counts, max_pixels, media

    def __iter__(self):
        from data.decode import DecodeError
        from data.shards import ShardError, iter_shard, shard_shortfall

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in self.shards[worker::workers]:
            entries, images = [], []
            read, error = 0, None
            try:
                for raw in iter_shard(self.urls[index]):
                    read += 1
                    try:  # decoded as the training stream decodes it (data.decode, data.video), so replays are exact
                        generators = [view_generator(self.seed, raw["__key__"], v) for v in range(self.views)]
                        key, params, views = self.media.draw_views(raw, self.transform, generators, self.max_pixels)
                    except DecodeError as exn:
                        entries.append((raw["__key__"], None, str(exn)))
                        continue
                    images.extend(views)
                    entries.append((key, params, None))
                    if len(entries) >= self.chunk:
                        yield self._chunk(index, entries, images, False)
                        entries, images = [], []
                if read < self.counts[index]:
                    error = str(shard_shortfall(self.urls[index], read, self.counts[index]))
            except (ShardError, FileNotFoundError) as exn:
                error = str(exn)
            lost = max(0, self.counts[index] - read)
            # Stand-ins for the samples the shard did not give: its target shard keeps its count.
            entries.extend((f"unread-{n:06d}", None, error) for n in range(read, read + lost))
            yield self._chunk(index, entries, images, True, (lost, error) if error else None)

    @staticmethod
    def _chunk(index, entries, images, last, lost=None) -> dict:
        return {"shard": index, "entries": entries, "images": torch.stack(images) if images else None, "last": last,
                "lost": lost}


def _chunks(dataset: _Views, num_workers: int) -> Iterator[dict]:
    if num_workers == 0:
        yield from dataset
        return
    yield from torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)


# ----------------------------------------------------------------------------- the pass


def cache_targets(recipe: Recipe, views: int, out: str | os.PathLike, *, dtype: str = "float16",
                  tokens: bool = False, batch_size: int | None = None, num_workers: int | None = None,
                  accelerator=None, teacher=None, progress: bool = True) -> dict:
    """Write (or finish) the targets of ``recipe`` in ``out``; returns the completed manifest.

    ``accelerator`` and ``teacher`` may be given by a caller that has them (a training run
    caching on first use: ``data.targets=auto``); otherwise they are made from the recipe, as
    the training run makes them (same seed, so random-weight teachers agree).
    """
    from accelerate import Accelerator
    from data.locks import cache_lock


    if dtype not in DTYPES:
        raise TargetsError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if views < 1:
        raise TargetsError(f"--views must be at least 1, got {views}")
    if accelerator is None:
        accelerator = Accelerator(mixed_precision=recipe.run.mixed_precision)
        if accelerator.device.type == "cpu":  # as the training run does (run.cpu_threads)
            from bootstrap.launch import cpu_threads

            local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
            torch.set_num_threads(cpu_threads(recipe.run.cpu_threads, local))
    main = accelerator.is_main_process
    if teacher is None:  # resolve, as the training run does: the demo's data and teacher, the same seed
        from bootstrap.resolve import build_teacher, with_demo, with_steps

        if not recipe.teacher and recipe.demo is None:
            raise TargetsError("the recipe has no teacher (it trains with labels alone): there are no teacher "
                               "targets to cache")
        recipe = with_steps(with_demo(recipe, accelerator, verbose=main), accelerator.num_processes)
        teacher = build_teacher(recipe)
    from teachers.frames import media_teacher

    transform = recipe.train_transform(teacher)  # an image's view, or a clip's: frames + one crop and flip
    teacher = media_teacher(teacher, recipe.media)
    device = accelerator.device
    home = next(teacher.parameters()).device
    teacher.to(device).eval()
    manifest = run_manifest(recipe, teacher, transform, views, dtype, tokens)
    out = Path(out).expanduser()
    # One process (the main one of one command or run) fills the folder at a time; another waits, then finds it done.
    with cache_lock(out / LOCK, f"the targets in {out}") if main else contextlib.nullcontext():
        return _fill(recipe, accelerator, teacher, home, transform, manifest, out, views, dtype, tokens, batch_size,
                     num_workers, progress)


def _fill(recipe: Recipe, accelerator, teacher, home, transform, manifest: dict, out: Path, views: int, dtype: str,
          tokens: bool, batch_size: int | None, num_workers: int | None, progress: bool) -> dict:
    """`cache_targets` once the folder is this command's (the main process holds its lock)."""
    from tqdm.auto import tqdm
    import webdataset as wds

    from data.shards import count_tar_samples, resolve_shards

    main, device, d = accelerator.is_main_process, accelerator.device, recipe.data
    urls = resolve_shards(d.train, d.allow_pipe)
    counts = [s["num_samples"] for s in manifest["train_shards"]]

    def done(i: int) -> bool:
        path = out / (TARGET_SHARD % i)
        try:
            return path.is_file() and count_tar_samples(str(path)) == counts[i]
        except Exception:  # noqa: BLE001 - an unreadable leftover is rewritten
            return False

    old, finished = None, False
    if main:
        out.mkdir(parents=True, exist_ok=True)
        old = read_manifest(out)
        if old is not None:
            diff = first_difference(old, manifest, CACHE_FIELDS)
            if diff is not None:
                raise TargetsError(f"{out} holds targets made with other settings ({diff}); choose another --out "
                                   f"or delete {out}")
        for stale in out.glob("*.tmp"):  # what a killed run was writing
            stale.unlink()
        # Incomplete until this pass ends, also where a shard of a complete folder went missing.
        finished = old is not None and old.get("complete") and all(done(i) for i in range(len(urls)))
        if not finished:
            write_manifest(out, manifest)
    accelerator.wait_for_everyone()
    if not main and read_manifest(out) is None:
        raise TargetsError(f"{out} has no manifest on this process: the folder must be shared by all processes")

    rank, world = accelerator.process_index, accelerator.num_processes
    todo = [i for i in range(rank, len(urls), world) if not done(i)]
    workers = d.num_workers if num_workers is None else num_workers
    batch = batch_size or d.eval_batch_size
    dataset = _Views(urls, todo, transform, views, recipe.run.seed, max(1, batch // views), counts, d.max_pixels,
                     recipe.media)
    np_dtype = DTYPES[dtype]
    total = sum(counts[i] for i in todo) * views
    bar = tqdm(total=total, desc=f"caching targets (rank {rank})" if world > 1 else "caching targets", unit="img",
               disable=not (main and progress) or total == 0, dynamic_ncols=True, file=sys.stdout)
    writers: dict[int, tuple] = {}
    teacher_time, images_done, t_start = 0.0, 0, time.perf_counter()
    for chunk in _chunks(dataset, workers):
        i = chunk["shard"]
        if i not in writers:
            tmp = out / (TARGET_SHARD % i + f".{rank}.tmp")
            # mtime an int: a float one costs a 1 KB PAX header per member.
            writers[i] = (wds.TarWriter(str(tmp), mtime=0, encoder=False), tmp, [0])
        writer, tmp, written = writers[i]
        embed = toks = None
        if chunk["images"] is not None:
            t0 = time.perf_counter()
            embed, toks = _embed(teacher, chunk["images"], batch, device, accelerator, tokens)
            teacher_time += time.perf_counter() - t0
            images_done += chunk["images"].shape[0]
        j = 0
        for key, params, error in chunk["entries"]:
            if params is None:
                writer.write(encode_skipped(key, error))
            else:
                writer.write(encode_sample(key, params, embed[j:j + views].numpy().astype(np_dtype),
                                           None if toks is None else toks[j:j + views].numpy().astype(np_dtype)))
                j += views
            written[0] += 1
        bar.update(j)
        if chunk["last"]:
            writer.close()
            del writers[i]
            if written[0] != counts[i]:
                tmp.unlink()
                raise TargetsError(f"image shard {urls[i]} holds {written[0]} samples, more than the {counts[i]} "
                                   f"counted for it: the shard or its dataset.json changed; re-create the shard "
                                   f"folder with python -m data.make_shards")
            if chunk["lost"]:
                lost, error = chunk["lost"]
                bar.write(f"skipped {lost} of the {counts[i]} samples of image shard {urls[i]}, which could not be "
                          f"read ({error}); training skips them too", file=sys.stdout)
            os.replace(tmp, out / (TARGET_SHARD % i))  # complete: only now does the shard exist
    bar.close()
    seconds = time.perf_counter() - t_start

    accelerator.wait_for_everyone()
    if main and finished:  # found complete (e.g. made by the command this one waited for)
        print(f"targets: {out} is complete already; train with data.targets={out}", flush=True)
    elif main:
        missing = [i for i in range(len(urls)) if not done(i)]
        if missing:
            raise TargetsError(f"target shards {[TARGET_SHARD % i for i in missing[:5]]} are missing after the pass; "
                               f"run the command again")
        if d.val is not None:
            _cache_heldout(recipe, teacher, out, device, accelerator)
        size = sum((out / (TARGET_SHARD % i)).stat().st_size for i in range(len(urls)))
        manifest["bytes"] = size
        manifest["bytes_per_view"] = size / max(1, manifest["num_samples"] * views)
        if images_done:  # a rerun that found everything done keeps the first pass's speed
            manifest["stats"] = {"img_per_s": images_done / max(seconds, 1e-9),
                                 "teacher_img_per_s": images_done / max(teacher_time, 1e-9),
                                 "rank0_views": images_done}
        elif old is not None and "stats" in old:
            manifest["stats"] = old["stats"]
        manifest["shard_sha256"] = [file_sha256(out / (TARGET_SHARD % i))
                                    for i in tqdm(range(len(urls)), desc="checksums", disable=len(urls) < 100)]
        manifest["complete"] = True
        write_manifest(out, manifest)
        if images_done:
            print(f"cached {images_done} views on rank 0 in {seconds:.1f} s: {images_done / seconds:.1f} img/s "
                  f"(teacher alone {images_done / max(teacher_time, 1e-9):.1f} img/s)", flush=True)
        print(f"targets: {out} ({size / 1e6:.1f} MB, {manifest['bytes_per_view']:.0f} bytes per image per view); "
              f"train with data.targets={out}", flush=True)
    accelerator.wait_for_everyone()
    teacher.to(home)
    return read_manifest(out) if not main or finished else manifest


@torch.inference_mode()
def _embed(teacher, images: torch.Tensor, batch: int, device, accelerator, tokens: bool):
    embeds, toks = [], []
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch].to(device, non_blocking=True)
        with accelerator.autocast():
            embeds.append(teacher.embed(x).float().cpu())
            if tokens:
                toks.append(final_tokens(teacher, x).float().cpu())
    return torch.cat(embeds), (torch.cat(toks) if tokens else None)


def _cache_heldout(recipe: Recipe, teacher, out: Path, device, accelerator) -> None:
    from bootstrap.heldout import embed_all, load_heldout

    d = recipe.data
    images, keys = load_heldout(d.val, teacher, d.heldout_samples, d.allow_pipe, d.max_pixels, recipe.media)
    with torch.inference_mode():
        embed = embed_all(teacher.embed, images, d.eval_batch_size, device, accelerator.autocast)
    save_heldout(out, embed, keys)


def default_out(recipe: Recipe, views: int) -> Path:
    """Where the targets go without --out: beside the run's output folder."""
    return Path(f"{recipe.run.output_dir.rstrip('/')}-targets-k{views}")


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m bootstrap.cache_targets", usage=USAGE,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for bootstrap/run.py")
    parser.add_argument("--views", type=int, required=True, help="augmented views per image (K)")
    parser.add_argument("--out", default=None, help="targets folder (default: RUN_OUTPUT_DIR-targets-kK)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored target precision")
    parser.add_argument("--tokens", action="store_true", help="also cache the final-normed tokens of every view")
    parser.add_argument("--batch-size", type=int, default=None, help="views per teacher batch (default "
                        "data.eval_batch_size)")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding workers per process (default "
                        "data.num_workers)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        out = args.out or default_out(recipe, args.views)
        cache_targets(recipe, args.views, out, dtype=args.dtype, tokens=args.tokens, batch_size=args.batch_size,
                      num_workers=args.num_workers, progress=not args.no_progress)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
