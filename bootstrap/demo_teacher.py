"""The demo's teacher: a small CLIP trained here, on the demo's images and captions, and cached.

No pretrained weights can be downloaded for the demo, and a random-weight teacher gives
nearly the same embedding for every image, so alignment, zero-shot and probe numbers would
prove little. The demo therefore trains its own small open_clip CLIP first (a few minutes on
a CPU) and caches it; later runs and other processes (evaluation, export) reuse the file.

How it is trained (what made a tiny CLIP learn within minutes on a CPU): the text tower
stays LOCKED at its random initialisation, and only the image tower (with the logit scale)
learns to meet fixed text embeddings:

* a cross-entropy over the demo classes, whose logits are the image embedding against the
  zero-shot classifier (the class prompts of `data.demo.DEMO_TEMPLATES` through the text
  tower, averaged per class, exactly what zero-shot evaluation builds),
* ``caption_weight`` x the CLIP contrastive loss between images and their captions
  ("a photo of a small red star on bluish and grey stripes") within a batch, so that
  embeddings also tell colour, size and background apart and differ from image to image,
  not only by class;
* ``uniformity_weight`` x the uniformity of the image embeddings in a batch, which spreads
  them apart, so that held-out retrieval can tell a student from a constant (the demo recipe
  uses 0.5: at 1.0 the spreading competed with the shapes, zero-shot 41% instead of 58% for
  a 6-layer teacher); and
* ``consistency_weight`` x (1 - cosine) between two views of each image shifted by
  different few pixels. Without it the tiny ViT aliases on its patch grid: on the first,
  single-tint demo data a 1-pixel shift moved its embedding (cosine 0.94) about as far as the
  nearest other image lay (0.90), a change that a smooth student (the SparseFormer samples a
  stride-4 feature map) cannot follow. With it that teacher was also better (zero-shot 55%
  instead of 49.5%).

What the teacher learns is bounded by its steps more than its depth: in about the same time,
4 layers for 1000 steps reach 80% zero-shot where 6 layers for 600 steps reach 58%, and the
better teacher is also the easier one for a student to match image by image (the demo
recipe's choice). It trains by its steps alone, whatever the clock says, so a busy machine
caches the same teacher as a quiet one; a teacher whose zero-shot top-1 on the demo's val split
stays below ``min_zero_shot`` (a quality floor well above the 10% of chance) is neither cached
nor used (`DemoTeacherError`), and a cached one below the floor is refused.

The result is a folder in open_clip's local format, ``open_clip_config.json`` (model_cfg,
preprocess_cfg) and ``open_clip_model.safetensors``, plus ``demo_teacher.json`` (how it was
trained and its zero-shot accuracy on the demo's val split). Its folder name hashes the
teacher settings and the data, so a change to either trains a new one. Cache root:
``demo.cache_dir``, else ``$SPARSEFORMER_CACHE``, else ``~/.cache/sparseformer-bootstrap``.

    python -m bootstrap.demo_teacher [recipes/demo.yaml] [key=value ...]   # prepare the cache only
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from data.errors import UserError

from .config import DemoConfig, DemoTeacherConfig, Recipe

CONFIG_JSON = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
INFO_JSON = "demo_teacher.json"
DEMO_MODEL_NAME = "demo-clip"


def cache_root(demo: DemoConfig | None = None) -> Path:
    """The project's cache folder: ``demo.cache_dir``, else ``$SPARSEFORMER_CACHE``, else
    ``~/.cache/sparseformer-bootstrap``."""
    root = (demo.cache_dir if demo is not None else None) or os.environ.get("SPARSEFORMER_CACHE") \
        or "~/.cache/sparseformer-bootstrap"
    return Path(root).expanduser()


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _locked(path: Path):
    """An exclusive lock on `path` (a file next to the cached folder): one process builds, others wait (saying so)."""
    from data.locks import cache_lock

    return cache_lock(path, f"the cached {path.parent.name} {path.stem}")


def _data_args(demo: DemoConfig) -> dict:
    return {"num": demo.num_images, "seed": demo.data_seed, "size": demo.image_size,
            "val_fraction": demo.val_fraction}


def _data_key(demo: DemoConfig) -> dict:
    """What the cached data depends on: the arguments and how data.demo renders them."""
    from data.demo import DEMO_DATA_VERSION

    return {**_data_args(demo), "version": DEMO_DATA_VERSION}


def _cached_data(folder: Path, info_json: str, make, what: str, verbose: bool) -> Path:
    """``folder``, made once by ``make(tmp)`` (which writes ``info_json`` there) under a lock, then renamed into place."""
    if (folder / info_json).is_file():
        return folder
    with _locked(folder.with_name(folder.name + ".lock")):
        if (folder / info_json).is_file():
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        if verbose:
            print(f"making {what} in {folder} ...", flush=True)
        make(tmp)
        # The info file names the folder it was written to: rewrite it for its final place.
        info = json.loads((tmp / info_json).read_text())
        info["out_dir"] = str(folder)
        (tmp / info_json).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, folder)
        if verbose:
            print(f"{what.split(' (')[0]} ready in {time.time() - t0:.0f} s", flush=True)
    return folder


def ensure_demo_data(demo: DemoConfig, verbose: bool = True) -> Path:
    """The demo dataset folder (``train/``, ``val/``, ``demo.json``), generated once and cached."""
    from data.demo import make_demo_dataset

    args = _data_args(demo)
    folder = cache_root(demo) / "demo-data" / _digest(_data_key(demo))
    return _cached_data(folder, "demo.json", lambda tmp: make_demo_dataset(tmp, **args),
                        f"the demo dataset ({args['num']} images of {args['size']} px)", verbose)


def model_cfg(cfg: DemoTeacherConfig, image_size: int) -> dict:
    """The open_clip model config of the demo CLIP."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": cfg.layers, "width": cfg.width,
                       "head_width": cfg.width // cfg.heads, "patch_size": cfg.patch_size},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": cfg.text_width,
                     "heads": cfg.text_heads, "layers": cfg.text_layers},
    }


def teacher_spec(folder: Path) -> dict:
    """The `teachers.create_teacher` spec of a cached demo teacher (usable from any process)."""
    config = json.loads((folder / CONFIG_JSON).read_text())
    return {"kind": "openclip", "model": DEMO_MODEL_NAME, "model_cfg": config["model_cfg"],
            "pretrained": str(folder / WEIGHTS)}


class DemoTeacherError(UserError, RuntimeError):
    """A demo teacher below the quality floor (`demo.teacher.min_zero_shot`)."""


def _teacher_key(demo: DemoConfig) -> dict:
    """What a cached teacher depends on: its settings and the data it learnt from."""
    return {"teacher": asdict(demo.teacher), "data": _data_key(demo), "version": 2}


def _check_quality(info: dict, floor: float, where: Path) -> dict:
    """The teacher's info, if its zero-shot top-1 on the demo val split reaches ``floor``."""
    accuracy = info.get("zero_shot_top1_val")
    if not isinstance(accuracy, (int, float)) or accuracy < floor:
        shown = f"{100 * accuracy:.1f}%" if isinstance(accuracy, (int, float)) else "no recorded accuracy"
        raise DemoTeacherError(
            f"the demo teacher in {where} has {shown} zero-shot top-1 on the demo val split (chance "
            f"{100 * info.get('chance', 0.1):.0f}%), below demo.teacher.min_zero_shot={100 * floor:.0f}%: a student "
            f"aligned to it would mean nothing. Train a better one (more demo.teacher.steps) or, for a test, lower "
            f"the floor")
    return info


def ensure_demo_teacher(demo: DemoConfig, data_dir: Path, verbose: bool = True, progress: bool = True) -> Path:
    """The cached demo teacher folder, trained first if it is not there. A teacher below the quality floor is
    not cached: it is left in ``<folder>.below-floor`` for a look, and the error says so. A verbose one shows the
    training's progress bar unless ``progress`` is false."""
    folder = cache_root(demo) / "demo-teacher" / _digest(_teacher_key(demo))
    floor = demo.teacher.min_zero_shot
    if (folder / INFO_JSON).is_file():
        _check_quality(json.loads((folder / INFO_JSON).read_text()), floor, folder)
        return folder
    with _locked(folder.with_name(folder.name + ".lock")):
        if (folder / INFO_JSON).is_file():
            _check_quality(json.loads((folder / INFO_JSON).read_text()), floor, folder)
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        info = train_demo_teacher(demo, data_dir, tmp, verbose=verbose, progress=progress)
        try:
            _check_quality(info, floor, folder)
        except DemoTeacherError as exc:
            aside = folder.with_name(folder.name + ".below-floor")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(tmp, aside)
            raise DemoTeacherError(f"{exc} (this one is kept in {aside}, not cached)") from None
        os.replace(tmp, folder)
    return folder


def ensure_demo_videos(demo: DemoConfig, verbose: bool = True, progress: bool = True) -> Path:
    """The demo video folder (``train/``, ``val/``, ``video_demo.json``; `data.video_demo`), generated once and
    cached."""
    from data.video_demo import VIDEO_DEMO_VERSION, make_video_demo_dataset

    v = demo.video
    args = {"num": v.num_videos, "seed": v.seed, "size": demo.image_size, "frames": v.frames,
            "val_fraction": v.val_fraction}
    folder = cache_root(demo) / "demo-videos" / _digest({**args, "version": VIDEO_DEMO_VERSION})
    return _cached_data(folder, "video_demo.json", lambda tmp: make_video_demo_dataset(
        tmp, **args, progress=verbose and progress),
                        f"the demo videos ({v.num_videos} videos of {v.frames} frames of {demo.image_size} px)",
                        verbose)


def teacher_summary(spec) -> dict:
    """What a run's summary says of its teacher: the spec's kind, model and weights, and for the demo teacher how
    it was trained and how good it is (its demo_teacher.json); a run with labels alone has none."""
    if not spec:
        return {"description": "none (the run learns from labels alone)"}
    out = {k: spec.get(k) for k in ("kind", "model", "pretrained")}
    pretrained = spec.get("pretrained")
    info = Path(pretrained).with_name(INFO_JSON) if isinstance(pretrained, str) else None
    if info is not None and info.is_file():
        demo = json.loads(info.read_text())
        out["demo_teacher"] = {k: demo.get(k) for k in ("steps", "seconds", "zero_shot_top1_val", "chance")}
        out["description"] = (f"the demo teacher {info.parent} ({demo.get('steps')} steps; zero-shot top-1 "
                              f"{100 * demo.get('zero_shot_top1_val', 0):.1f}% on the demo val split, chance "
                              f"{100 * demo.get('chance', 0):.0f}%)")
    else:
        out["description"] = f"{spec.get('kind')}:{spec.get('model')} ({pretrained})"
    return out


def prepare_demo(recipe: Recipe, verbose: bool = True) -> Recipe:
    """Make (or find) the demo data and teacher; a new recipe whose `teacher`, `data.train/val` and `eval.data`
    (and `eval.train_data`) are the demo's where the recipe leaves them empty (no teacher where the run needs
    none). With `demo.video` the data are the demo videos, and the teacher is still the image demo's (trained on the
    demo images, applied frame by frame)."""
    demo = recipe.demo
    progress = recipe.run.progress  # run.progress=false: the lines, without progress bars
    data_dir = ensure_demo_data(demo, verbose)
    sections = {}
    # A run with labels alone whose student does not start from its teacher needs none (recipes/demo_supervised.yaml).
    if not recipe.teacher and recipe.needs_teacher:
        sections["teacher"] = teacher_spec(ensure_demo_teacher(demo, data_dir, verbose, progress))
    if demo.video is not None:
        data_dir = ensure_demo_videos(demo, verbose, progress)
    data = {}
    if recipe.data.train is None:
        data["train"] = str(data_dir / "train")
    if recipe.data.val is None:
        data["val"] = str(data_dir / "val")
    if data:
        sections["data"] = dataclasses.replace(recipe.data, **data)
    if recipe.eval.data is None:  # the report's zero-shot and probe: val split, probe trained on train
        sections["eval"] = recipe.eval.replace(data=str(data_dir / "val"), train_data=recipe.eval.train_data
                                               or str(data_dir / "train"))
    return recipe.replace(**sections)


# ----------------------------------------------------------------------------- training


def _load_split(folder: Path, transform) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a demo split as one tensor, with labels and captions (the demo is small)."""
    from data.decode import decode_sample
    from data.shards import iter_shard, resolve_shards

    images, labels, captions = [], [], []
    for url in resolve_shards(str(folder)):
        for raw in iter_shard(url):
            sample = decode_sample(raw)
            images.append(transform(sample["image"]))
            labels.append(sample["cls"])
            captions.append(sample["txt"])
    return torch.stack(images), torch.tensor(labels), captions


def _augment(images: torch.Tensor, gen: torch.Generator, shift: int = 4,
             flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random translation by up to `shift` pixels (edge padding) and horizontal flips (random, or
    where `flip` says), per image; returns the images and the flips."""
    b, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen).tolist()
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen).tolist()
    out = torch.stack([p[:, y:y + h, x:x + w] for p, x, y in zip(padded, dx, dy)])
    if flip is None:
        flip = torch.rand(b, 1, 1, 1, generator=gen) < 0.5
    return torch.where(flip, out.flip(3), out), flip


def uniformity(feats: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean exp(-t |f_i - f_j|^2) over pairs of a batch (Wang & Isola, 2020): lower is more spread out."""
    d2 = torch.cdist(feats, feats).pow(2)
    off = ~torch.eye(len(feats), dtype=torch.bool, device=feats.device)
    return torch.log(torch.exp(-t * d2[off]).mean())


@torch.no_grad()
def _text_embeddings(teacher, texts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch):
        out.append(teacher.encode_text(teacher.tokenizer(texts[start:start + batch])))
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(encode, images: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                       batch: int = 256) -> float:
    """Top-1 of `eval.zeroshot`'s logits for the images encoded in batches."""
    from eval.zeroshot import zero_shot_logits

    correct = 0
    for start in range(0, images.shape[0], batch):
        logits = zero_shot_logits(encode(images[start:start + batch]), classifier)
        correct += logits.argmax(-1).eq(labels[start:start + batch]).sum().item()
    return correct / max(1, images.shape[0])


def train_demo_teacher(demo: DemoConfig, data_dir: Path, out: Path, verbose: bool = True,
                       progress: bool = True) -> dict:
    """Train the demo CLIP's image tower against its locked text tower; write it to `out` (verbose: with a
    progress bar unless ``progress`` is false)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from data.demo import DEMO_CLASSNAMES
    from eval.zeroshot import zero_shot_classifier
    from teachers import create_teacher

    cfg = demo.teacher
    mcfg = model_cfg(cfg, demo.image_size)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        teacher = create_teacher({"kind": "openclip", "model": DEMO_MODEL_NAME, "model_cfg": mcfg,
                                  "pretrained": None})
    clip = teacher.model
    transform = teacher.eval_transform()
    t0 = time.time()
    train_x, train_y, captions = _load_split(data_dir / "train", transform)
    val_x, val_y, _ = _load_split(data_dir / "val", transform)
    classifier = zero_shot_classifier(teacher, DEMO_CLASSNAMES, "demo")  # [embed_dim, classes]
    caption_emb = _text_embeddings(teacher, captions)

    # Only the image tower learns; the text tower stays as initialised. The temperature is
    # fixed at CLIP's largest, 100: the locked text embeddings lie close together, and a smaller
    # scale would leave the class logits too flat to learn from.
    clip.requires_grad_(False)
    clip.visual.requires_grad_(True)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100.0))
    scale = 100.0
    decay = [p for p in clip.visual.parameters() if p.ndim >= 2]
    no_decay = [p for p in clip.visual.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    warmup = max(1, cfg.steps // 20)
    n = train_x.shape[0]
    encode = clip.encode_image
    chance = 1 / len(DEMO_CLASSNAMES)
    if verbose:
        print(f"training the demo teacher (CLIP image tower width {cfg.width}, {cfg.layers} layers, locked random "
              f"text tower) on {n} images: {cfg.steps} steps of {cfg.batch_size} ...", flush=True)
    bar = tqdm(total=cfg.steps, desc="demo teacher", unit="step", dynamic_ncols=True,
               disable=not (verbose and progress), file=sys.stdout)
    clip.visual.train()
    step, perm, pos = 0, torch.randperm(n, generator=gen), 0
    while step < cfg.steps:
        progress = step / cfg.steps
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        views, flip = _augment(train_x[idx], gen)
        pairs = min(len(idx), cfg.consistency_images or len(idx)) if cfg.consistency_weight else 0
        if pairs:  # a second view of the first `pairs` images, shifted differently
            views = torch.cat([views, _augment(train_x[idx[:pairs]], gen, flip=flip[:pairs])[0]])
        feats = F.normalize(encode(views), dim=-1)
        feats, second = feats[:len(idx)], feats[len(idx):]  # `second`: empty without pairs
        # The zero-shot classifier as a fixed head: what zero-shot evaluation will compute.
        loss = F.cross_entropy(scale * feats @ classifier, train_y[idx])
        if cfg.caption_weight:
            logits = scale * feats @ caption_emb[idx].T
            target = torch.arange(len(idx))
            loss = loss + cfg.caption_weight * 0.5 * (F.cross_entropy(logits, target)
                                                     + F.cross_entropy(logits.T, target))
        if pairs:  # shifted views agree: against aliasing on the patch grid (see the module doc)
            loss = loss + cfg.consistency_weight * (1 - (feats[:pairs] * second).sum(-1)).mean()
        if cfg.uniformity_weight:
            # Spread the embeddings of different images apart: a student can then be told
            # from a constant (held-out retrieval), and the embedding says more than the class.
            loss = loss + cfg.uniformity_weight * uniformity(feats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.visual.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    clip.requires_grad_(False)
    clip.eval()
    accuracy = zero_shot_accuracy(encode, val_x, val_y, classifier)
    seconds = time.time() - t0
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / WEIGHTS))
    pp = teacher.preprocess
    (out / CONFIG_JSON).write_text(json.dumps({
        "model_cfg": mcfg,
        "preprocess_cfg": {"size": list(pp.size), "mean": list(pp.mean), "std": list(pp.std),
                           "interpolation": pp.interpolation, "resize_mode": pp.resize_mode},
    }, indent=1) + "\n")
    info = {"zero_shot_top1_val": accuracy, "chance": chance, "steps": step, "seconds": round(seconds, 1),
            "finished": True,
            "train_images": n, "val_images": int(val_x.shape[0]), "settings": asdict(cfg), "data": str(data_dir)}
    (out / INFO_JSON).write_text(json.dumps(info, indent=1) + "\n")
    if verbose:
        print(f"demo teacher trained: {step} steps in {seconds:.0f} s; zero-shot top-1 on the demo val split "
              f"{100 * accuracy:.1f}% (chance {100 * chance:.0f}%)", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    from .config import RecipeError, load_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and "=" not in argv[0] else str(Path(__file__).resolve().parents[1] / "recipes/demo.yaml")
    try:
        recipe = load_recipe(path, argv)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if recipe.demo is None:
        print(f"error: {path} has no demo: section", file=sys.stderr)
        return 2
    recipe = prepare_demo(recipe)
    print(f"demo teacher: {recipe.teacher['pretrained']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
