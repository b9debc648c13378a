"""Checkpoints of a run: written atomically, loaded safely, the last K kept, the latest complete one found again.

A checkpoint is ``OUTPUT/checkpoints/step-0001000/`` holding only files that load without
running code (a checkpoint folder may come from anywhere: a copied run, a shared disk):

* ``model.safetensors``: the trained module's full state dict;
* ``optimizer.pt``: the optimizer's state dict, read back with ``torch.load(weights_only=True)``
  (tensors, numbers and lists only; a pickle that would build any other object is refused);
* ``rng-rank-N.safetensors``: each rank's random states (torch, CUDA, numpy, Python);
* ``state.json``: the `TrainState` (step, data position, counters), the LR scheduler's and the
  gradient scaler's states, the format, and the SHA-256 of every other file;
* ``COMPLETE``: the marker, written last.

Loading checks the format, that every file is the one the run wrote (its SHA-256), that no
other file was put in the folder, and that the weights fit the run's model; any failure is a
`CheckpointError` naming the file and the fix. accelerate's ``save_state`` is not used: its
random-state and custom-state files are pickles that it unpickles without ``weights_only``,
so a tampered checkpoint would run code on resume, and it ignores a random-state file it
cannot read (a resumed run would then silently differ).

Everything is first written to ``checkpoints/.tmp-step-0001000/`` and renamed into place only
once complete, so a run killed while writing leaves a ``.tmp-*`` folder (removed by the next
save) and never a checkpoint that looks usable but is not. Resuming picks the
highest-numbered folder with the marker. A disk that fills up while writing is reported as
such; the earlier checkpoints are untouched.

All ranks call `save_checkpoint` and `load_checkpoint` (gathering the state dict is
collective); the main process writes the shared files, renames, writes the marker and prunes.
The output folder must be on a file system all ranks see.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from data.digest import file_sha256
from data.errors import UserError
from data.outputs import write_text

COMPLETE = "COMPLETE"
STATE_JSON = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
FORMAT = "sparseformer-bootstrap checkpoint v2"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.safetensors"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from (tampered, damaged, older format, another model)."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are intact."""
_NAME = re.compile(r"^step-(\d+)$")

# Test hook: the main process SIGKILLs itself in the middle of writing the checkpoint of this
# step (after accelerate wrote its files, before the marker), as a crash or a preemption would.
KILL_ENV = "BOOTSTRAP_TEST_KILL_IN_CHECKPOINT"


@dataclass
class TrainState:
    """Where a run is: registered with accelerate, so it travels with every checkpoint.

    The data position is ``(epoch, batch_in_epoch)``: the loader's sample order is a function
    of (seed, epoch, rank) alone, so a resumed run restarts epoch ``epoch`` and skips its first
    ``batch_in_epoch`` batches, reproducing the batches an uninterrupted run would have seen.
    """

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch of the training stream
    batch_in_epoch: int = 0  # batches of this epoch already consumed (on every rank)
    samples_seen: int = 0  # over all ranks
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient
    nonfinite_in_row: int = 0
    phase: int = 0  # index of the training phase (the optimizer in the checkpoint is this phase's)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(self)}
        for key, value in state.items():
            if key not in names or not isinstance(value, int) or isinstance(value, bool):
                raise CheckpointError(f"{STATE_JSON}: train state '{key}' = {value!r} is not what a run writes")
            setattr(self, key, value)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_state(path: str | os.PathLike) -> dict:
    """The train state (step, data position, counters) in the ``state.json`` of a checkpoint."""
    return read_manifest(path)["train_state"]


def read_manifest(path: str | os.PathLike) -> dict:
    """The whole ``state.json`` of a checkpoint, checked to be one this version writes."""
    file = Path(path) / STATE_JSON
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a checkpoint of this project") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not readable JSON ({exc}): the checkpoint is damaged or was tampered "
                              f"with; resume from an earlier checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        older = (Path(path) / "custom_checkpoint_0.pkl").exists() or (isinstance(manifest, dict) and "step" in manifest)
        why = ("it was written by an older version of this project with accelerate's pickle files, which are not "
               "loaded because unpickling a file can run code" if older else "its format is unknown")
        raise CheckpointError(f"{path} cannot be resumed from: {why}. Start the run anew (run.resume=none) or "
                              f"resume from a checkpoint this version wrote")
    for key in ("train_state", "files"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{file}: '{key}' is missing or not a mapping; the checkpoint is damaged")
    try:  # every value an integer, as a run writes them (a string step would fail later, in arithmetic)
        TrainState().load_state_dict(manifest["train_state"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}; the checkpoint is damaged or was edited: resume from an earlier "
                              f"checkpoint or start anew (run.resume=none)") from None
    return manifest


def resolve_resume(resume: str, root: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``none``, ``auto`` (latest complete one, or none), or a path.

    A path may name a checkpoint folder or a run folder (its latest complete checkpoint).
    """
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume).expanduser()
    if path.is_dir() and not _NAME.match(path.name) and (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"run.resume={resume}: the run folder has no complete checkpoint")
        return latest
    if not path.is_dir():
        raise FileNotFoundError(f"run.resume={resume}: no such checkpoint folder (use auto, none, or a "
                                f"checkpoints/step-NNNNNNN folder)")
    if not is_complete(path):
        raise FileNotFoundError(f"run.resume={resume}: the checkpoint is incomplete (no {COMPLETE} marker: "
                                f"the run stopped while writing it); resume from an earlier one")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """A new file, on disk, renamed over ``path`` (never written through a symlink there)."""
    write_text(path, text, durable=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's random states as tensors (+ safetensors metadata for the scalars)."""
    version, py_state, gauss = random.getstate()
    name, np_key, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np_key.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = t
    meta = {"python": json.dumps([version, gauss]), "numpy": json.dumps([name, pos, has_gauss, cached])}
    return tensors, meta


def _set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _json_state(obj) -> dict | None:
    """A scheduler's or gradient scaler's state dict, which holds numbers and lists only."""
    if obj is None:
        return None
    state = obj.state_dict()
    json.dumps(state)  # a TypeError here is a bug: a state this format cannot hold
    return state


def _write_failed(exc: BaseException, root: Path, name: str) -> CheckpointWriteError:
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and "unexpected pos" in str(exc):  # torch.save's zip writer on a full disk
        full = shutil.disk_usage(root).free < (64 << 20)
    kept = latest_checkpoint(root)
    earlier = f"the earlier checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
    what = "the disk is full" if full else f"{type(exc).__name__}: {exc}"
    fix = "free space (or move run.output_dir)" if full else "fix the cause"
    return CheckpointWriteError(f"could not write checkpoint {name} in {root}: {what}; {earlier}. {fix.capitalize()} "
                                f"and rerun the same command to resume")


def save_checkpoint(accelerator, root: str | os.PathLike, state: TrainState, keep: int, model, optimizer,
                    scheduler=None) -> Path:
    """Write the checkpoint of `state.step` (collective: call on every rank); returns its folder."""
    from safetensors.torch import save_file

    root = Path(root)
    name = checkpoint_name(state.step)
    final, tmp = root / name, root / f".tmp-{name}"
    failed = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by a run killed while writing
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            failed = exc
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(model)  # collective (gathers FSDP shards)
    try:
        if failed is None:
            tensors, meta = _rng_tensors()
            save_file(tensors, str(tmp / rng_file(accelerator.process_index)), metadata=meta)
    except OSError as exc:
        failed = exc
    accelerator.wait_for_everyone()  # every rank's RNG file is written
    if accelerator.is_main_process and failed is None:
        try:
            # Copies: safetensors refuses tensors that share storage (a Sparsifiner with share_inout_proj).
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in full_state.items()}, str(tmp / MODEL_FILE),
                      metadata={"format": "pt"})
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
            manifest = {"format": FORMAT, "train_state": state.state_dict(), "processes": accelerator.num_processes,
                        "scheduler": _json_state(scheduler), "scaler": _json_state(accelerator.scaler),
                        "files": files}
            atomic_write_text(tmp / STATE_JSON, json.dumps(manifest, indent=1) + "\n")
            if os.environ.get(KILL_ENV) == str(state.step):
                os.kill(os.getpid(), signal.SIGKILL)
            for f in tmp.iterdir():  # the data must be on disk before the marker says it is
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            atomic_write_text(tmp / COMPLETE, "")
        except Exception as exc:  # noqa: BLE001 - turned into one clear error below
            failed = exc
    if failed is not None and accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; earlier checkpoints stay
    # Every rank must learn of a failure on the main process, or they would wait for it forever.
    bad = torch.tensor(float(failed is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad.item() > 0:
        if failed is not None:
            raise _write_failed(failed, root, name) from failed
        raise CheckpointWriteError(f"could not write checkpoint {name} in {root} (another rank failed; see its error)")
    if accelerator.is_main_process:
        if final.exists():  # e.g. the same step saved again after a resume
            old = root / f".tmp-old-{name}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: str | os.PathLike, processes: int | None = None) -> dict:
    """Check a checkpoint folder against its ``state.json``; returns the manifest.

    Every file must be listed with its SHA-256 (a file changed after the run wrote it, or one
    added to the folder, is refused), and the folder must hold the files of `processes` ranks.
    """
    path = Path(path)
    manifest = read_manifest(path)
    listed = manifest["files"]
    for f in sorted(path.iterdir()):
        if f.name in (STATE_JSON, COMPLETE) or f.name.startswith("."):
            continue
        if f.name not in listed:
            raise CheckpointError(f"{f} was not written by the run (it is not listed in {STATE_JSON}); remove it, "
                                  f"or resume from a checkpoint the run wrote")
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        if name not in listed:
            raise CheckpointError(f"{path / STATE_JSON} lists no {name}: the checkpoint is damaged")
    for name, digest in listed.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete; resume from an earlier one")
        if file_sha256(f) != digest:
            raise CheckpointError(f"{f} is not the file the run wrote (its SHA-256 differs from {STATE_JSON}): it "
                                  f"was changed or damaged; resume from an earlier checkpoint")
    written_by = manifest.get("processes")
    if processes is not None and written_by != processes:
        raise CheckpointError(f"{path} was written by {written_by} process(es) and this run has {processes}: the "
                              f"data order and random states are per process, so resume with {written_by} "
                              f"process(es)")
    return manifest


def load_checkpoint(accelerator, path: str | os.PathLike, state: TrainState, model, optimizer,
                    scheduler=None) -> None:
    """Restore a run from the checkpoint folder `path` (every rank); see the module doc."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    manifest = verify_checkpoint(path, accelerator.num_processes)
    state.load_state_dict(manifest["train_state"])
    try:
        weights = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / MODEL_FILE} is not a readable safetensors file ({exc})") from None
    module = accelerator.unwrap_model(model)
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(own[k].shape)}"
              for k in own.keys() & weights.keys() if weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"] if unexpected else []) + \
                shapes[:5]
        raise CheckpointError(f"{path / MODEL_FILE} does not fit this run's model ({'; '.join(parts)}): the checkpoint "
                              f"is of another recipe; use another run.output_dir, or run.resume=none")
    module.load_state_dict(weights)
    try:
        opt_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unpickling error, a wrong structure: one message
        raise CheckpointError(f"{path / OPTIMIZER_FILE} is not an optimizer state this run can load "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    theirs = [len(g.get("params", ())) for g in opt_state.get("param_groups", ())] \
        if isinstance(opt_state, dict) else None
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs is not None and theirs != ours and sum(theirs) == sum(ours):
        # The same parameters, split otherwise between weight decay and none.
        raise CheckpointError(f"{path / OPTIMIZER_FILE} splits the trained parameters {theirs} between weight decay "
                              f"and none, this run {ours}: it was written by a version that decayed other parameters "
                              f"(before the student's no_weight_decay() was asked). Resume it with that version, or "
                              f"start anew (run.resume=none)")
    try:
        optimizer.load_state_dict(opt_state)
    except Exception as exc:  # noqa: BLE001 - a wrong structure: one message
        raise CheckpointError(f"{path / OPTIMIZER_FILE} is not an optimizer state this run can load "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if scheduler is not None and manifest.get("scheduler") is not None:
        scheduler.load_state_dict(manifest["scheduler"])
    if accelerator.scaler is not None and manifest.get("scaler") is not None:
        accelerator.scaler.load_state_dict(manifest["scaler"])
    rng = path / rng_file(accelerator.process_index)
    try:
        with safe_open(str(rng), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        _set_rng(tensors, meta)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{rng} holds no random states this run can restore ({type(exc).__name__}: {exc}); "
                              f"without them a resumed run differs from an uninterrupted one. Resume from an "
                              f"earlier checkpoint") from None


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the last `keep` complete checkpoints."""
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
