"""Writing output files as new files, never through what already sits at their names.

A run folder, an export or a report folder may come from someone else and hold symlinks where outputs go
(``report.md -> ~/.bashrc``): opening such a name for writing writes into the file the link points to.
Here each output is written to a new file beside it (created exclusively under a random name, so nothing
already there is opened) and then renamed over its name with ``os.replace``, which replaces a symlink
itself, not its target. Readers never see a half-written file either. Appending (logs) cannot rename, so
it refuses a symlink instead.

    write_text(out / "report.md", text)
    with replacing(out / "student.safetensors") as tmp:   # any writer that takes a path
        save_file(tensors, str(tmp))
    with new_files_into(out) as tmp:                       # a writer of several files by name
        tokenizer.save_pretrained(tmp)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, TextIO

__all__ = ["SymlinkRefused", "new_files_into", "open_append", "replacing", "write_bytes", "write_text"]


class SymlinkRefused(OSError):
    """An output that would be written through a symlink."""


def _new_temp(path: Path) -> Path:
    """A new empty file beside ``path`` (same folder, so the rename is atomic), with its suffix (writers such
    as matplotlib's ``savefig`` pick the format from it). Mode 0666 less the umask, as ``open`` gives."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """A new temporary path beside ``path`` to write; renamed over ``path`` when the block ends without an
    error (replacing a file or a symlink there, never writing through it), removed otherwise.
    ``durable``: flushed to disk before the rename (a checkpoint's manifest)."""
    path = Path(path)
    tmp = _new_temp(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """``Path.write_text`` (UTF-8) as a new file renamed over ``path``."""
    with replacing(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``Path.write_bytes`` as a new file renamed over ``path``."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def new_files_into(folder: str | os.PathLike) -> Iterator[Path]:
    """A new private folder inside ``folder`` for a writer that writes several files by name (an HF
    ``save_pretrained``); each file it wrote is then renamed into ``folder`` over its name."""
    folder = Path(folder)
    tmp = folder / f".new-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            if f.is_dir() and not f.is_symlink():
                raise IsADirectoryError(f"{f.name}: only files are moved into {folder}")
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_append(path: str | os.PathLike) -> TextIO:
    """``open(path, "a")`` (UTF-8), created if missing; refuses a symlink (one line naming it)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError:
        if path.is_symlink():
            raise SymlinkRefused(f"{path} is a symlink (to {os.readlink(path)}); an output is never written "
                                 f"through one: remove it") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")
