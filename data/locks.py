"""A lock on a cache folder that several processes may fill at once (two runs with
``data.targets=auto``, two demos): one fills it, the others wait with a message, then use it.

A file lock (``filelock``: ``flock`` on POSIX, ``msvcrt`` on Windows), released when the holder
ends, however it ends, so a killed process leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (created with its folder) for the ``with`` block. A process that
    finds it held prints one line saying it waits for ``what`` (e.g. "the targets in DIR") and waits."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that is making {what} (lock file {path}) ...", file=sys.stderr,
              flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
