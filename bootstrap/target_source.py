"""Where a run's alignment targets come from: the teacher online, or cached targets (`data.targets`).

Chosen once per run by `target_source`; the loop asks ``targets.targets(images, extras, needs)``
for what its phase needs (`students.family.Phase.needs`: embedding, tokens, attention).

* ``data.targets: null`` (default), `OnlineTargets`: the teacher sits on the device and
  embeds every batch.
* ``data.targets: DIR``, `CachedTargets`: a folder from ``python -m bootstrap.cache_targets``.
  It is checked against the run (teacher spec and weights hash, augmentation, image shards;
  incomplete, missing or corrupt targets are refused, naming what is wrong; every target shard
  is checked against its SHA-256 when read, and a few cached views and held-out targets against
  the teacher's own embedding of them, once at the start); the loader then
  replays the stored views (the pixels the teacher saw) and ships each view's target with
  the batch. The teacher's forward never runs in the loop: the teacher is still built, on
  the CPU, because bootstrapping copies its last blocks, norm and head into the student and
  its weights hash identifies the cache, but it is not moved to the device. The held-out
  check reads the cached held-out targets; only when the cache has none for the run's
  held-out images does the teacher go to the device once to embed them (said in the log).
  The final report (``eval.report``) builds the teacher itself, as for any run.
* ``data.targets: auto``: like DIR, with the folder in the cache (``demo.cache_dir``,
  ``$SPARSEFORMER_CACHE`` or ``~/.cache/sparseformer-bootstrap``, under ``targets/``), named by a
  hash of what the targets depend on, and made on first use with one view per epoch of the
  run (so no view repeats), or ``data.target_views`` views (fewer: less of the teacher's work, views repeat).

Cached targets stop at the embedding: a phase that needs the teacher's attention maps (the
Sparsifiner reconstruct phase) runs the teacher online; final tokens can be cached
(``bootstrap.cache_targets --tokens``, shipped as ``extras["target_tokens"]``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

from torch import Tensor


class NoTargets:
    """A run without a teacher (labels alone): the batches carry all its terms need."""

    cached = False
    store = None

    def targets(self, images: Tensor, extras: dict, needs) -> dict:
        if needs:  # the recipe's checks keep teacher terms out of a run without a teacher
            raise RuntimeError(f"a run without a teacher has no teacher targets ({', '.join(needs)})")
        return {}


class OnlineTargets:
    """The teacher embeds every batch (on the device)."""

    cached = False
    store = None

    def __init__(self, teacher, device):
        self.teacher = teacher.to(device).eval()

    def embed(self, images: Tensor, extras: dict) -> Tensor:
        return self.teacher.embed(images)

    def provides(self, needs) -> bool:
        return True

    def targets(self, images: Tensor, extras: dict, needs) -> dict:
        return self.teacher.targets(images, needs)

    def heldout(self, keys: list[str], run: Callable) -> Tensor:
        """Held-out targets: ``run(teacher.embed)`` embeds the held-out images."""
        return run(self.teacher.embed)


class CachedTargets:
    """Targets that arrive with the batch (``extras["target"]``), from a checked targets folder."""

    cached = True

    def __init__(self, teacher, device, store, say: Callable[[str], None] = print):
        self.teacher, self.device, self.store, self.say = teacher, device, store, say

    def embed(self, images: Tensor, extras: dict) -> Tensor:
        return extras["target"].to(images.device, non_blocking=True)

    def provides(self, needs) -> bool:
        """Whether the cache holds everything `needs` names (the embedding; tokens with --tokens)."""
        have = {"embedding"} | ({"tokens"} if self.store.tokens else set())
        return set(needs) <= have

    def run_online_for(self, phases) -> None:
        """Phases whose needs the cache does not hold (attention maps) run the teacher: it goes to the device."""
        online = [p.name for p in phases if p.steps and not self.provides(p.needs)]
        if online:
            self.teacher.to(self.device)
            self.say(f"phase {', '.join(online)} needs more than the cache holds (it has the embedding"
                     f"{' and tokens' if self.provides(('tokens',)) else ''}): the teacher runs online there")

    def targets(self, images: Tensor, extras: dict, needs) -> dict:
        if not self.provides(needs):
            return self.teacher.targets(images, needs)
        out = {"embedding": self.embed(images, extras)}
        if "tokens" in needs:
            out["tokens"] = extras["target_tokens"].to(images.device, non_blocking=True)
        return {k: v for k, v in out.items() if k in needs}

    def heldout(self, keys: list[str], run: Callable) -> Tensor:
        from data.targets import load_heldout_targets

        cached = load_heldout_targets(self.store.folder, keys)
        if cached is not None:
            return cached
        self.say(f"the held-out images have no targets in {self.store.folder}: the teacher embeds them once")
        home = next(self.teacher.parameters()).device
        self.teacher.to(self.device)
        try:
            return run(self.teacher.embed)
        finally:
            self.teacher.to(home)


def run_epochs(recipe, world_size: int) -> int:
    """Epochs the whole run takes (at least 1)."""
    from data.shards import resolve_shards, shard_sample_counts
    from data.stream import batches_per_rank

    d = recipe.data
    samples = d.epoch_samples or sum(c or 0 for c in shard_sample_counts(resolve_shards(d.train, d.allow_pipe)))
    per_epoch = batches_per_rank(samples, world_size, d.batch_size)
    steps = recipe.family.steps(recipe.student, recipe.optim)  # all phases
    return max(1, math.ceil(steps * recipe.optim.grad_accum / per_epoch))


def auto_dir(recipe, teacher, views: int) -> Path:
    """The cache folder of ``data.targets=auto``: named by what the targets depend on (the same on
    every rank: the teacher by its spec without the weights' location, and its weights hash)."""
    from data.targets import teacher_identity, weights_sha256

    from .demo_teacher import cache_root

    root = cache_root(recipe.demo)
    d = recipe.data
    key = {"teacher": teacher_identity(recipe.teacher), "weights": weights_sha256(teacher), "train": d.train, "augment": d.augment, "val": d.val,
           "decode": d.decode,
           "heldout": d.heldout_samples, "views": views, "seed": recipe.run.seed,
           "precision": recipe.run.mixed_precision, "max_pixels": d.max_pixels, "version": 2}
    if recipe.media.video:  # the clips (image runs keep the folders they had)
        key["media"] = recipe.media.settings()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return root / "targets" / digest


def target_source(recipe, teacher, transform, accelerator, say: Callable[[str], None] = print):
    """The run's `OnlineTargets` or `CachedTargets` (``recipe.data.targets``), `NoTargets` without a teacher; with cached targets
    the folder is checked against this run first (``data.targets.TargetsError`` naming the field)."""
    from data.shards import resolve_shards
    from data.targets import CHECK_SAMPLES, RUN_FIELDS, check_against_teacher, open_targets, read_manifest, warn_view_reuse

    from .cache_targets import run_manifest
    from .heldout import load_heldout

    d = recipe.data
    if teacher is None:
        return NoTargets()
    if d.targets is None:
        return OnlineTargets(teacher, accelerator.device)
    folder = Path(d.targets).expanduser()
    epochs = run_epochs(recipe, accelerator.num_processes)
    if d.targets == "auto":
        views = d.target_views or epochs
        folder = auto_dir(recipe, teacher, views)
        if not (read_manifest(folder) or {}).get("complete"):
            from .cache_targets import cache_targets

            say(f"data.targets=auto: caching the teacher's targets ({views} views per image) in {folder}")
            cache_targets(recipe, views, folder, accelerator=accelerator, teacher=teacher, progress=recipe.run.progress)
    manifest = read_manifest(folder) or {}
    views = manifest.get("views", 1)
    wanted = run_manifest(recipe, teacher, transform, views, manifest.get("dtype", "float16"),
                          manifest.get("tokens_shape") is not None)
    store = open_targets(folder, {k: wanted[k] for k in RUN_FIELDS}, resolve_shards(d.train, d.allow_pipe))
    # A manifest can be edited: a few cached views and held-out targets are embedded again by the teacher.
    heldout = None if d.val is None else load_heldout(d.val, teacher, CHECK_SAMPLES, d.allow_pipe, d.max_pixels,
                                                      recipe.media)
    home = next(teacher.parameters()).device
    check_against_teacher(store, lambda x: teacher.embed(x.to(home)).float().cpu(), transform, heldout,
                          max_pixels=d.max_pixels, media=recipe.media)
    if accelerator.is_main_process and not (d.targets == "auto" and d.target_views):  # not where the recipe chose it
        warn_view_reuse(store.views, epochs)
    say(f"cached targets: {folder} ({store.views} views per image, {manifest.get('dtype')}); the teacher stays on "
        f"the CPU and never runs in the loop")
    return CachedTargets(teacher, accelerator.device, store, say)
