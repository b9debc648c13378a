"""The one base class of the errors a user can fix: bad input, named in one line.

Every command (`bootstrap/run.py`, `python -m bootstrap.cache_targets`, `python -m eval`,
`python -m eval.compare`, `python -m students.export`, `python -m students.to_transformers`, ...)
catches `UserError` and prints ``error: <message>`` on stderr, without a traceback, with a non-zero
exit status (2 for input that is wrong as given; `bootstrap/run.py` exits 1 for a run that started
and could not go on). Each package's own errors (a shard that
does not read, a recipe key that does not exist, a teacher spec that names no model, a checkpoint
that does not fit) derive from it, and keep their standard base (`ValueError`, `RuntimeError`,
`OSError`) so that code catching those still does.

It lives in the lowest layer (`data`) so that every layer can raise it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input (a recipe, a file, a folder, an option) that the user can fix; the message says how."""
