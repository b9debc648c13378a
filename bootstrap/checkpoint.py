"""Checkpoints of a run: written atomically, the last K kept, the latest complete one found again.

A checkpoint is ``OUTPUT/checkpoints/step-0001000/``: accelerate's ``save_state`` (student,
optimizer, scheduler, gradient scaler, every rank's RNG states and the registered
`TrainState`), ``state.json`` (the same `TrainState` readable: step, data position, counters)
and, written last, the marker ``COMPLETE``. Everything is first written to
``checkpoints/.tmp-step-0001000/`` and renamed into place only once complete, so a run killed
while writing leaves a ``.tmp-*`` folder (removed by the next save) and never a checkpoint
that looks usable but is not. Resuming picks the highest-numbered folder with the marker.

All ranks call `save_checkpoint` (``save_state`` is collective); the main process renames,
writes the marker and prunes. The output folder must be on a file system all ranks see.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

COMPLETE = "COMPLETE"
STATE_JSON = "state.json"
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

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
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
    """The ``state.json`` of a checkpoint."""
    return json.loads((Path(path) / STATE_JSON).read_text())


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(accelerator, root: str | os.PathLike, state: TrainState, keep: int) -> Path:
    """Write the checkpoint of `state.step` (collective: call on every rank); returns its folder."""
    root = Path(root)
    name = checkpoint_name(state.step)
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's RNG file is written
    if accelerator.is_main_process:
        _atomic_write_text(tmp / STATE_JSON, json.dumps(state.state_dict(), indent=1) + "\n")
        if os.environ.get(KILL_ENV) == str(state.step):
            os.kill(os.getpid(), signal.SIGKILL)
        for f in tmp.iterdir():  # the data must be on disk before the marker says it is
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _atomic_write_text(tmp / COMPLETE, "")
        if final.exists():  # e.g. the same step saved again after a resume
            old = root / f".tmp-old-{name}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the last `keep` complete checkpoints."""
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
