"""Fetching pretrained weights without hanging on a machine with no network.

huggingface_hub retries an unreachable host with back-off (about 25 s per
file, and open_clip tries two files), so a teacher spec with a tag would sit
for close to a minute before failing offline. `fetch` therefore tries the
local cache first with the hub switched to offline mode, goes online only
when the hub answers a quick connect, and turns download failures into a
`TeacherWeightsError` that says how to supply the weights instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlparse

from .base import TeacherWeightsError

T = TypeVar("T")

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub serve from its cache only (it reads this flag on every request)."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def hub_is_offline() -> bool:
    """True when the user switched the hub off (HF_HUB_OFFLINE=1): never go online then."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub endpoint.

    Behind a proxy a direct connect says nothing, so we assume reachable and
    let the library try.
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_download_error(exc: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a failed download / cache miss.

    huggingface_hub's errors (cache miss, offline mode, HTTP), urllib's and
    socket errors are all OSError; open_clip re-raises them as RuntimeError,
    so the chain is walked.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fetch(load: Callable[[], T], what: str, how_to_supply: str) -> T:
    """Run `load()` (which downloads weights through huggingface_hub) cache-first.

    Args:
        load: builds the model with its pretrained weights.
        what: names the weights in errors, e.g. "open_clip ViT-B-32 tag 'openai'".
        how_to_supply: the fix, appended to the error.
    """
    try:
        with hub_offline():
            return load()
    except Exception as exc:  # noqa: BLE001 - only download failures fall through
        if not is_download_error(exc):
            raise
        cached_error = exc
    if hub_is_offline():
        reason = "they are not in the local cache and the hub is switched off (HF_HUB_OFFLINE is set)"
    elif not hub_reachable():
        reason = "they are not in the local cache and the Hugging Face Hub cannot be reached from this machine"
    else:
        try:
            return load()
        except Exception as exc:  # noqa: BLE001
            if not is_download_error(exc):
                raise
            raise TeacherWeightsError(f"could not download the weights of {what}: {_short(exc)}\n{how_to_supply}") \
                from exc
    raise TeacherWeightsError(f"could not obtain the weights of {what}: {reason}.\n{how_to_supply}") \
        from cached_error


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."
