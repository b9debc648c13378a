"""The SHA-256 of a file (or an open file object), read in chunks: what checkpoints, target shards, exports and
run comparisons record of the files they trust."""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

__all__ = ["file_sha256", "sha256_of"]


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of the file at ``path``."""
    with open(path, "rb") as f:
        return sha256_of(f)


def sha256_of(f: BinaryIO) -> str:
    """The hex SHA-256 of what is left to read of the open file ``f``."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()
