"""Cached teacher targets: K augmented views per image, stored once, replayed in training.

``python -m bootstrap.cache_targets`` writes a targets folder; ``data.targets: DIR`` in a
recipe replays it (`bootstrap.target_source`). The folder holds::

    targets.json              the manifest (below); "complete": true once every shard is written
    targets-000000.tar, ...   one target shard per image shard, in the image shards' order
    heldout.safetensors       the held-out set's (un-augmented) targets, float32

Target shard ``i`` belongs to image shard ``i`` of the manifest's ``train_shards`` and holds
one sample per image sample, in the same order and with the same ``__key__``::

    KEY.views.json   [{"crop": [top, left, h, w], "flip": bool, "jitter": [[op, factor], ...], "gray": bool}] * K
    KEY.emb.npy      [K, D] teacher embeddings of the K views (float16 or float32)
    KEY.tok.npy      [K, L, width] the teacher's final tokens (only with --tokens)
    KEY.skip.json    instead of the above, for an image that did not decode when caching

The training stream reads target shard ``i`` side by side with image shard ``i`` (so every
rank and worker reads only the target shards of its own image shards) and checks the keys
match. View choice: epoch ``e`` uses view ``(e + offset(key)) % K``, ``offset`` a hash of the
key, so consecutive epochs show an image in different views and a batch mixes view indices.

The manifest records what the targets depend on; a folder made for another teacher (spec or
weights hash), augmentation, image shards, pixel limit, view count or dtype is refused, naming
the field. It also records the SHA-256 of every target shard (``shard_sha256``): a shard is
hashed when it is opened (once per shard and process) and refused if it changed or was swapped
in from another cache. A manifest can be edited, so a run also re-embeds a few cached views and
held-out images with its own teacher (`check_against_teacher`) and refuses targets that differ.
Manifests of version 1 (no checksums) are refused: their shards cannot be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_sample
from .digest import sha256_of
from .errors import UserError
from .shards import ShardError, count_tar_samples, iter_shard, iter_tar_stream

MANIFEST = "targets.json"
TARGET_SHARD = "targets-%06d.tar"
HELDOUT = "heldout.safetensors"
FORMAT = "sparseformer-bootstrap/teacher-targets"
VERSION = 2  # 2: per-shard SHA-256 (shard_sha256) and max_pixels
DTYPES = {"float16": np.float16, "float32": np.float32}

# Fields of the manifest that a training run must match, in the order they are checked and named.
RUN_FIELDS = ("format", "version", "teacher", "weights_sha256", "augment", "train_shards", "max_pixels")
# ... and that a rerun of the caching command must match to continue where it stopped.
CACHE_FIELDS = RUN_FIELDS + ("views", "dtype", "target_shape", "tokens_shape", "seed", "precision", "heldout")


class TargetsError(UserError, ValueError):
    """A targets folder that does not fit the run (or is incomplete, missing, corrupt)."""


# ----------------------------------------------------------------------------- identity


def stable_hash(*parts: Any) -> int:
    """A 63-bit hash of ``parts`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def view_generator(seed: int, key: str, view: int) -> torch.Generator:
    """The generator that draws view ``view`` of the image ``key`` (one seed per image and view)."""
    return torch.Generator().manual_seed(stable_hash("view", seed, key, view))


def view_index(epoch: int, key: str, views: int) -> int:
    """The view of image ``key`` that epoch ``epoch`` uses: ``(epoch + offset(key)) % views``."""
    return (epoch + stable_hash("offset", key) % views) % views


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes), e.g. the teacher's weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def teacher_identity(spec: Mapping[str, Any]) -> dict:
    """The teacher spec as the manifest records it: without the weights' location (`pretrained`,
    `cache_dir`): the weights are identified by their hash, so moved or re-saved files still fit."""
    return {k: v for k, v in sorted(spec.items()) if k not in ("pretrained", "cache_dir")}


def shard_entries(urls: Sequence[str], counts: Sequence[int]) -> list[dict]:
    """The image shards as the manifest records them: file name and sample count, in order."""
    return [{"name": os.path.basename(u), "num_samples": int(c)} for u, c in zip(urls, counts)]


def make_manifest(*, teacher_spec: Mapping, weights_sha256: str, augment: Mapping, train_urls: Sequence[str],
                  train_counts: Sequence[int], views: int, dtype: str, target_shape: Sequence[int],
                  tokens_shape: Sequence[int] | None = None, seed: int = 0, precision: str = "no",
                  heldout: Mapping | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """The manifest of a targets folder (``complete`` False until every shard is written)."""
    if dtype not in DTYPES:
        raise TargetsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if views < 1:
        raise TargetsError(f"views must be at least 1, got {views}")
    return {
        "format": FORMAT, "version": VERSION, "teacher": teacher_identity(teacher_spec),
        "weights_sha256": weights_sha256, "augment": dict(augment), "train_shards": shard_entries(train_urls, train_counts),
        "max_pixels": max_pixels,
        "views": int(views), "dtype": dtype, "target_shape": list(target_shape),
        "tokens_shape": None if tokens_shape is None else list(tokens_shape),
        "seed": int(seed), "precision": precision, "heldout": dict(heldout) if heldout else None,
        "num_samples": int(sum(train_counts)), "complete": False,
    }


def _json_plain(obj):
    return json.loads(json.dumps(obj))  # tuples -> lists, as they come back from the file


def first_difference(cached: Mapping, wanted: Mapping, fields: Sequence[str] = RUN_FIELDS) -> str | None:
    """``"field: cache has X, this run has Y"`` for the first checked field that differs, or None."""
    for name in fields:
        a, b = _json_plain(cached.get(name)), _json_plain(wanted.get(name))
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"{name}.{key}: the cache has {a.get(key)!r}, this run has {b.get(key)!r}"
        if isinstance(a, list) and isinstance(b, list) and name == "train_shards":
            if len(a) != len(b):
                return f"{name}: the cache has {len(a)} image shards, this run has {len(b)}"
            i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            return f"{name}[{i}]: the cache has {a[i]}, this run has {b[i]}"
        return f"{name}: the cache has {_short(a)}, this run has {_short(b)}"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise TargetsError(f"cannot read {path}: {exn}; delete the folder and run bootstrap.cache_targets again") \
            from exn
    if isinstance(manifest.get("augment"), dict):
        # Caches made before the decode path was recorded decoded every image whole.
        manifest["augment"].setdefault("decode", "full")
    return manifest


# Target shards this process has verified, by (path, device, inode, size, mtime): each is hashed once.
_VERIFIED: set[tuple] = set()


def _open_verified(path: str, sha256: str | None):
    """``path`` opened for reading after checking its SHA-256 against the manifest's (once per process)."""
    f = open(path, "rb")
    try:
        st = os.fstat(f.fileno())
        key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            if sha256 is None or sha256_of(f) != sha256:
                raise TargetsError(f"target shard {path} is not the one cached (its SHA-256 differs from {MANIFEST}): "
                                   f"it was changed or replaced after caching; delete the targets folder and run "
                                   f"bootstrap.cache_targets again")
            _VERIFIED.add(key)
            f.seek(0)
    except BaseException:
        f.close()
        raise
    return f


def write_manifest(folder: str | os.PathLike, manifest: Mapping) -> None:
    """Write the manifest atomically (a killed writer leaves the old one or the new one)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- samples


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, views: Sequence[dict], embed: np.ndarray, tokens: np.ndarray | None = None) -> dict:
    """One target sample (the member files of ``KEY``) for ``TarWriter``."""
    sample = {"__key__": key, "views.json": json.dumps(list(views)).encode(), "emb.npy": _npy(embed)}
    if tokens is not None:
        sample["tok.npy"] = _npy(tokens)
    return sample


def encode_skipped(key: str, error: str) -> dict:
    """The target sample of an image that did not decode while caching (training skips it too)."""
    return {"__key__": key, "skip.json": json.dumps({"error": error}).encode()}


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------- the store


class TargetStore:
    """A complete targets folder checked against a run, read side by side with its image shards.

    Picklable (paths and the manifest only): DataLoader workers get a copy. Build it with
    ``open_targets``.
    """

    def __init__(self, folder: str | os.PathLike, manifest: Mapping, image_urls: Sequence[str]):
        self.folder = Path(folder)
        self.manifest = dict(manifest)
        self.views = int(manifest["views"])
        self.tokens = manifest.get("tokens_shape") is not None
        self.image_urls = list(image_urls)
        self._target_of = {url: str(self.folder / (TARGET_SHARD % i)) for i, url in enumerate(image_urls)}
        hashes = manifest.get("shard_sha256") or []
        self._sha256_of = {str(self.folder / (TARGET_SHARD % i)): h for i, h in enumerate(hashes)}

    def target_url(self, image_url: str) -> str:
        try:
            return self._target_of[image_url]
        except KeyError:
            raise TargetsError(f"image shard {image_url} is not among the shards the targets in {self.folder} "
                               f"were made for") from None

    def view_index(self, epoch: int, key: str) -> int:
        return view_index(epoch, key, self.views)

    def iter_shard(self, url: str) -> Iterator[dict]:
        """The raw samples of image shard ``url``, each with its target sample under ``"__targets__"``;
        the target shard is checked against its SHA-256 in the manifest first (``TargetsError``)."""
        target_url = self.target_url(url)
        targets = self._iter_targets(target_url)
        for n, sample in enumerate(iter_shard(url)):
            try:
                target = next(targets, None)
            except ShardError as exn:
                raise TargetsError(f"target shard {target_url} is corrupt ({exn.__cause__ or exn}); delete it and "
                                   f"run bootstrap.cache_targets again to rewrite it") from exn
            if target is None or target["__key__"] != sample["__key__"]:
                found = "it ends there" if target is None else f"it holds {target['__key__']!r} there"
                raise TargetsError(
                    f"no cached target for image {sample['__key__']!r} (sample {n}) of shard {url}: target shard "
                    f"{target_url} does not match ({found}); the image shards changed since caching: run "
                    f"bootstrap.cache_targets again")
            yield {**sample, "__targets__": target}

    def _iter_targets(self, path: str) -> Iterator[dict]:
        with _open_verified(path, self._sha256_of.get(path)) as f:
            yield from iter_tar_stream(f, path)

    def decode(self, sample: dict) -> dict:
        """``{"views": [...], "embed": float32 tensor [K, D], "tokens": ... | None}`` of a raw target
        sample; a target that does not decode raises ``TargetsError`` naming the key and shard."""
        raw = sample["__targets__"]
        where = f"target of {sample['__key__']!r} in {raw.get('__url__')}"
        try:
            views = json.loads(raw["views.json"])
            embed = torch.from_numpy(_load_npy(raw["emb.npy"]).astype(np.float32))
            tokens = torch.from_numpy(_load_npy(raw["tok.npy"]).astype(np.float32)) if "tok.npy" in raw else None
        except Exception as exn:  # noqa: BLE001 - any failure here is a damaged target shard
            if "skip.json" in raw:  # the image did not decode when caching either: decoding it fails first
                raise TargetsError(f"{where}: the image did not decode when caching, but decodes now; the image "
                                   f"shards changed: run bootstrap.cache_targets again") from exn
            raise TargetsError(f"{where} is corrupt ({type(exn).__name__}: {exn}); delete that target shard and "
                               f"run bootstrap.cache_targets again") from exn
        if len(views) != self.views or embed.shape[0] != self.views:
            raise TargetsError(f"{where} has {len(views)} views / {embed.shape[0]} targets, the manifest says "
                               f"{self.views}: the target shard is corrupt; rewrite it with bootstrap.cache_targets")
        return {"views": views, "embed": embed, "tokens": tokens}


def open_targets(folder: str | os.PathLike, wanted: Mapping, image_urls: Sequence[str]) -> TargetStore:
    """Check a targets folder against the run (``wanted``: a manifest from ``make_manifest``) and open it.

    Raises ``TargetsError`` naming the problem: no manifest, a field that differs, an incomplete
    cache, a missing or corrupt target shard, or one whose sample count is not its image shard's.
    """
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    if manifest is None:
        raise TargetsError(f"data.targets={folder} holds no {MANIFEST}: make the targets with "
                           f"`python -m bootstrap.cache_targets RECIPE --views K --out {folder}`")
    if manifest.get("format") == FORMAT and manifest.get("version") == 1:
        # Refused rather than trusted with a warning: nothing tells its shards from changed ones.
        raise TargetsError(f"the targets in {folder} were made by an older version, without the SHA-256 of each "
                           f"shard, so they cannot be verified: delete {folder} and make them again with "
                           f"bootstrap.cache_targets (data.targets=auto makes them by itself)")
    diff = first_difference(manifest, wanted)
    if diff is not None and diff.startswith("augment.decode:"):  # the same views, decoded as the cache decoded them
        diff += f" (set data.decode={manifest['augment']['decode']} to replay it)"
    if diff is not None:
        raise TargetsError(f"the targets in {folder} were made for another run: {diff}. Cache them for this "
                           f"recipe (python -m bootstrap.cache_targets) or drop data.targets")
    if not manifest.get("complete"):
        done = len(list(folder.glob("targets-*.tar")))
        raise TargetsError(f"the targets in {folder} are not complete ({done} of {len(manifest['train_shards'])} "
                           f"shards): run the same bootstrap.cache_targets command again to finish them")
    hashes = manifest.get("shard_sha256")
    if not (isinstance(hashes, list) and len(hashes) == len(manifest["train_shards"])
            and all(isinstance(h, str) for h in hashes)):
        raise TargetsError(f"{folder / MANIFEST} does not list the SHA-256 of each target shard: it is damaged or was "
                           f"edited; delete {folder} and run bootstrap.cache_targets again")
    for i, entry in enumerate(manifest["train_shards"]):
        path = folder / (TARGET_SHARD % i)
        if not path.is_file():
            raise TargetsError(f"target shard {path} (for image shard {entry['name']}) is missing: run "
                               f"bootstrap.cache_targets again to rewrite it")
        try:
            count = count_tar_samples(str(path))
        except ShardError as exn:
            raise TargetsError(f"target shard {path} is corrupt ({exn.__cause__ or exn}); delete it and run "
                               f"bootstrap.cache_targets again") from exn
        if count != entry["num_samples"]:
            raise TargetsError(f"target shard {path} holds {count} targets but image shard {entry['name']} holds "
                               f"{entry['num_samples']}: it is truncated or corrupt; delete it and run "
                               f"bootstrap.cache_targets again")
    return TargetStore(folder, manifest, image_urls)


def warn_view_reuse(views: int, epochs: int) -> bool:
    """Warn (once, at the start of a run) when the run has more epochs than cached views."""
    if epochs <= views:
        return False
    warnings.warn(f"this run takes {epochs} epochs but the targets hold {views} view(s) per image: from epoch "
                  f"{views} on every image repeats its views (cache more with bootstrap.cache_targets "
                  f"--views {epochs})", RuntimeWarning, stacklevel=2)
    return True


# ----------------------------------------------------------------------------- held-out


def save_heldout(folder: str | os.PathLike, embed: torch.Tensor, keys: Sequence[str]) -> None:
    """The held-out targets (un-augmented, float32) with the ``shard#key`` of each row, atomically."""
    from safetensors.torch import save_file

    path = Path(folder) / HELDOUT
    tmp = path.with_name(path.name + ".tmp")
    save_file({"embed": embed.float().contiguous()}, str(tmp), metadata={"keys": json.dumps(list(keys))})
    os.replace(tmp, path)


def load_heldout_targets(folder: str | os.PathLike, keys: Sequence[str]) -> torch.Tensor | None:
    """The cached held-out targets of ``keys`` (``shard#key``, matched by shard file name and key),
    or None when the cache has none for them."""
    from safetensors import safe_open

    path = Path(folder) / HELDOUT
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        cached = [_name_key(k) for k in json.loads(f.metadata()["keys"])]
        embed = f.get_tensor("embed")
    wanted = [_name_key(k) for k in keys]
    if cached[:len(wanted)] != wanted:
        return None
    return embed[:len(wanted)]


def _name_key(sample_id: str) -> str:
    url, _, key = sample_id.rpartition("#")
    return f"{os.path.basename(url)}#{key}"


# ----------------------------------------------------------------------------- against the teacher

#: Cached views (of the first image shard) and held-out images a run re-embeds with its teacher.
CHECK_SAMPLES = 4
#: Largest relative difference (L2) between a cached target and the teacher's embedding of the
#: same pixels. float16 storage and mixed precision stay well below it; another teacher, flipped
#: signs or rescaled targets are far above.
CHECK_TOLERANCE = 0.1


def compare_targets(cached: torch.Tensor, fresh: torch.Tensor, names: Sequence[str], what: str,
                    folder: str | os.PathLike, tolerance: float = CHECK_TOLERANCE) -> None:
    """Raise ``TargetsError`` naming the row of ``cached`` farthest from ``fresh`` (the teacher's
    embeddings of the same images) when it differs by more than ``tolerance`` (relative L2)."""
    cached, fresh = cached.float().reshape(len(names), -1), fresh.float().reshape(len(names), -1)
    error = (cached - fresh).norm(dim=1) / fresh.norm(dim=1).clamp_min(1e-12)
    worst = int(error.argmax())
    if not error[worst] <= tolerance:  # NaN fails too
        cosine = float(torch.nn.functional.cosine_similarity(cached[worst], fresh[worst], dim=0))
        raise TargetsError(f"the targets in {folder} were not made by this run's teacher: {what} {names[worst]} differs "
                           f"from the teacher's embedding by {float(error[worst]):.3f} (relative; cosine {cosine:.3f}, "
                           f"at most {tolerance} expected); the cache is of another teacher or was changed: delete it "
                           f"and run bootstrap.cache_targets again")


def check_against_teacher(store: TargetStore, embed, transform, heldout=None, samples: int = CHECK_SAMPLES,
                          max_pixels: int | None = DEFAULT_MAX_PIXELS, media=None) -> None:
    """Re-embed a few cached views with the run's teacher and compare (``compare_targets``).

    ``embed`` maps normalised images ``[B, 3, H, W]`` to the teacher's embeddings; ``transform``
    is the run's ``ReplayableTrainTransform`` (it renders the stored view parameters). The first
    ``samples`` decodable images of the first image shard are checked, each in another view.
    ``heldout``: ``(images, keys)`` of the run's first held-out images (un-augmented), checked
    against ``heldout.safetensors`` when the cache holds their targets. ``media`` (`data.media`; None: images)
    renders the stored view of a sample: an image's, or a clip's frames.
    """
    def render(raw: dict, params: dict) -> torch.Tensor:
        if media is not None:
            return media.replay(raw, transform, [params], max_pixels)[0]
        return transform.apply(decode_sample(raw, max_pixels)["image"], params)

    images, cached, names = [], [], []
    with contextlib.closing(store.iter_shard(store.image_urls[0])) as raws:
        for raw in raws:
            if "skip.json" in raw["__targets__"]:
                continue  # did not decode when caching
            target = store.decode(raw)
            view = len(images) % store.views
            try:
                images.append(render(raw, target["views"][view]))
            except DecodeError:
                continue  # skipped by training too
            cached.append(target["embed"][view])
            names.append(f"{raw['__key__']!r} (view {view}, shard {os.path.basename(store.image_urls[0])})")
            if len(images) >= samples:
                break
    with torch.no_grad():
        if images:
            compare_targets(torch.stack(cached), embed(torch.stack(images)), names, "the target of image",
                            store.folder)
        if heldout is not None:
            held = load_heldout_targets(store.folder, heldout[1][:samples])
            if held is not None:
                compare_targets(held, embed(heldout[0][:samples]), heldout[1][:samples], "the held-out target of",
                                store.folder)
