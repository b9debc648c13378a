"""The one loader of every configuration dataclass: unknown keys named with the nearest valid key,
and (for recipe sections) every value checked against its field's type.

    load(EvalConfig, {"tempaltes": "demo"}, "eval", error=RecipeError, dotted=True)
    -> RecipeError: unknown recipe key 'eval.tempaltes'. Did you mean 'eval.templates'? ...
    load(BootstrapOptions, {"token": 49}, "student options", error=ValueError)
    -> ValueError: unknown key 'token' in student options. Did you mean 'tokens'? ...

``dotted=True`` names a key by its dotted path from the top of a recipe (``optim.lr``), as a user
writes it in an override; otherwise by the key and the mapping it sits in. ``typed=True`` checks
each value against the field's annotation (``int``, ``float``, ``str``, ``bool``, ``Literal``,
``Union``, lists, tuples, mappings and nested dataclasses; an int is accepted for a float, a
list for a tuple) and a field may name its own loader with ``metadata={"coerce": fn}``, where
``fn(value, where)`` returns the value. Model configurations load untyped (their own
``validate()`` checks the values, and their JSON must round-trip as written).

After the fields are set, a dataclass's own ``__post_init__`` checks run; a `ValueError` there
is re-raised as ``error`` naming the section.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union

__all__ = ["check_keys", "closest", "load", "unknown_key"]


def closest(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The choice nearest to ``word`` (difflib), or None."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return match[0] if match else None


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def unknown_key(key: Any, valid: Sequence[str], where: str, *, error: type[Exception] = ValueError,
                dotted: bool = False) -> Exception:
    """The error for an unknown ``key`` of the mapping ``where`` (see the module docstring)."""
    if dotted:
        near = closest(key, valid, cutoff=0.5)
        hint = f" Did you mean '{_join(where, near)}'?" if near else ""
        return error(f"unknown recipe key '{_join(where, key)}'.{hint} "
                     f"Valid keys{' of ' + where if where else ''}: {', '.join(valid)}")
    near = closest(key, valid)
    hint = f" Did you mean '{near}'?" if near else ""
    return error(f"unknown key '{key}' in {where}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def check_keys(cls: type, data: Mapping[str, Any], where: str, *, error: type[Exception] = ValueError,
               dotted: bool = False) -> None:
    """Raise `unknown_key` for the first key of ``data`` that is not a field of the dataclass ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise unknown_key(key, names, where, error=error, dotted=dotted)


def load(cls: type, data: Any, where: str = "", *, error: type[Exception] = ValueError, dotted: bool = False,
         typed: bool = True):
    """An instance of the dataclass ``cls`` from the mapping ``data`` (see the module docstring)."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise error(f"'{where or 'the recipe'}' must be a mapping of keys, got {type(data).__name__} {data!r}")
    check_keys(cls, data, where, error=error, dotted=dotted)
    values = dict(data)
    if typed:
        hints = typing.get_type_hints(cls)
        coerce = {f.name: f.metadata.get("coerce") for f in dataclasses.fields(cls)}
        values = {key: (coerce[key] or (lambda v, w, tp=hints[key]: _coerce(tp, v, w, error)))(
            value, _join(where, key)) for key, value in values.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # the section's own checks (__post_init__)
        if isinstance(exc, error):
            raise
        raise error(f"{'recipe section ' if dotted else ''}'{where}': {exc}") from None


# The words YAML 1.1 (PyYAML) reads as False / True; a string choice spelled as one of them is meant.
_YAML_BOOL_WORDS = {False: ("no", "none", "off", "false"), True: ("yes", "on", "true")}


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _coerce(tp, value: Any, where: str, error: type[Exception]):
    """Check ``value`` against the type ``tp`` (int is accepted for float, lists for tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            try:
                return _coerce(option, value, where, error)
            except error:
                if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
                    raise  # a section with a bad key inside: name that key, not the section's type
        wanted = " or ".join(_type_name(a) for a in args)
        raise error(f"recipe key '{where}' must be {wanted}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads no/off/false (yes/on/true) as booleans: `run.mixed_precision=no` means "no".
            spelled = [a for a in args if isinstance(a, str) and a in _YAML_BOOL_WORDS[value]]
            if spelled:
                return spelled[0]
        if value not in args:
            near = closest(str(value), [str(a) for a in args], cutoff=0.5)
            hint = f" Did you mean '{near}'?" if near else ""
            raise error(f"recipe key '{where}' must be one of {', '.join(map(str, args))}, got {value!r}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return load(tp, value, where, error=error, dotted=True)
    if tp is type(None):
        if value is not None:
            raise error(f"recipe key '{where}' must be null, got {value!r}")
        return None
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"recipe key '{where}' must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"recipe key '{where}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"recipe key '{where}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise error(f"recipe key '{where}' must be a string, got the boolean {value}: YAML reads "
                        f"yes/no/on/off/true/false as booleans; quote the value, e.g. {where}='no'")
        if not isinstance(value, str):
            raise error(f"recipe key '{where}' must be a string, got {type(value).__name__} {value!r}")
        return value
    if tp in (list, tuple, dict):  # bare container types
        origin, args = tp, ()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"recipe key '{where}' must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise error(f"recipe key '{where}' must be a list of {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(a, v, f"{where}[{i}]", error) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}[{i}]", error) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise error(f"recipe key '{where}' must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    raise TypeError(f"schema type {tp!r} of '{where}' is not supported")  # a bug in the schema
