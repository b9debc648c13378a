"""The training batches of one rank, from a data position that resumes exactly, and what the loader skipped."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, TextIO

import torch
from torch import Tensor

from .checkpoint import TrainState

__all__ = ["TrainBatches", "loader_stats_over_ranks"]


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


class TrainBatches:
    """The training batches of one rank, epoch after epoch, from the position in `state`.

    Each batch is drawn with torch's global generator seeded by (seed, epoch, rank, index)
    and restored afterwards: in-process augmentation (num_workers=0) is a function of the
    position, and the DataLoader's worker seeds (drawn when the first batch is requested)
    are a function of (seed, epoch, rank). The training RNG (drop-path) is untouched.

    With `device`, `next()` gives the images on it, normalised there (`loader.normalize`: a loader
    with `uint8_batches` sends uint8 views, a quarter of the bytes, and leaves this work to the device).
    """

    def __init__(self, loader, state: TrainState, seed: int, rank: int, keys_file: TextIO | None = None,
                 device: torch.device | None = None):
        self.loader, self.state, self.seed, self.rank, self.keys_file = loader, state, seed, rank, keys_file
        self.device = device
        self._iter: Iterator | None = None

    def next(self) -> tuple[Tensor, dict]:
        """The next batch, recorded as consumed (and its sample keys logged, with `run.log_sample_keys`)."""
        if self._iter is None:
            self._iter = iter(self)
        images, extras = next(self._iter)
        if self.device is not None:
            images = self.loader.normalize(images.to(self.device, non_blocking=True))
        if self.keys_file is not None:
            self.keys_file.write("".join(f"{self.state.epoch}\t{self.state.step}\t{k}\n" for k in extras["__key__"]))
        self.consumed()
        return images, extras

    def close(self) -> None:
        if self.keys_file is not None:
            self.keys_file.close()

    def __iter__(self) -> Iterator[tuple[Tensor, dict]]:
        while True:
            epoch, skip = self.state.epoch, self.state.batch_in_epoch
            self.loader.set_epoch(epoch)
            it = iter(self.loader)
            for index in range(len(self.loader)):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_of("batch", self.seed, epoch, self.rank, index))
                    batch = next(it)
                if index >= skip:
                    yield batch
            next(it, None)  # lets the loader finish its epoch (and check its batch count)

    def consumed(self) -> None:
        """Record one batch as consumed (the data position saved with checkpoints)."""
        s = self.state
        s.batch_in_epoch += 1
        if s.batch_in_epoch >= len(self.loader):
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0


def loader_stats_over_ranks(accelerator, stats) -> dict:
    """The loader's skip counts summed over the ranks, with every skipped sample named (collective)."""
    from accelerate.utils import gather_object

    mine = [{"skipped": stats.skipped, "padded": stats.padded, "skipped_samples": list(stats.skipped_samples),
             "bad_shards": list(stats.bad_shards)}]
    every = gather_object(mine) if accelerator.num_processes > 1 else mine
    return {"skipped": sum(s["skipped"] for s in every), "padded": sum(s["padded"] for s in every),
            "skipped_samples": [k for s in every for k in s["skipped_samples"]],
            "bad_shards": sorted({k for s in every for k in s["bad_shards"]}),
            "per_rank": [s["skipped"] for s in every]}
