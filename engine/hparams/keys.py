"""How a hyperparameter key is declared: once, as a field of a hyperparameters dataclass.

The field's type says how a value read from a JSON / YAML file is coerced: ``int``, ``float``,
``bool``, ``str``, ``Optional[...]`` (null allowed), ``list[int]`` (e.g. layer indices) or
``list[list[int]]`` (pairs such as ``[max_tokens, n_gen]``). Its rule, if it has one, is given with
``hparam(default, check=...)``: a function of the coerced value that returns what is wrong with it,
or None; ``at_least``, ``above``, ``between`` and ``one_of`` build the common ones.

    @dataclass
    class MyHyperParams(MEMITHyperParams):
        my_scale: float = hparam(1.0, check=above(0, "the factor the update is scaled by"))

YAML note: PyYAML reads ``5e-1`` (no dot) as a string; float keys accept such strings, as
EasyEdit's loader does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Callable, Optional

Check = Callable[[Any], Optional[str]]


class HParamsError(ValueError):
    """An hparams file or value is invalid; the message names the key and how to fix it."""


def hparam(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
           check: Optional[Check] = None) -> Any:
    """A dataclass field for a hyperparameter key: its default (or `factory` for lists) and its check."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"check": check} if check else {})


def _why(why: str) -> str:
    return f" ({why})" if why else ""


def at_least(low: float, why: str = "") -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}{_why(why)}, got {v}"


def above(low: float, why: str = "") -> Check:
    return lambda v: None if v > low else f"must be > {low:g}{_why(why)}, got {v}"


def between(low: float, high: float, example: str) -> Check:
    """Strictly between `low` and `high`."""
    return lambda v: None if low < v < high else (
        f"must be between {low:g} and {high:g} (exclusive), e.g. {example}, got {v}")


def one_of(values: tuple) -> Check:
    return lambda v: None if v in values else f"must be one of {', '.join(map(str, values))}, got {v!r}"


# ------------------------------------------------------------------------------------- coercion


def _tname(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _as_float(v: Any, where: str) -> float:
    if isinstance(v, bool):
        raise HParamsError(f"{where}: must be a number, got a boolean {v!r}")
    if isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):
        try:
            out = float(v.strip())  # YAML reads "5e-1" as a string
        except ValueError:
            raise HParamsError(f"{where}: must be a number, got the string {v!r}") from None
    else:
        raise HParamsError(f"{where}: must be a number, got {_tname(v)} {v!r}")
    if not math.isfinite(out):
        raise HParamsError(f"{where}: must be a finite number, got {v!r}")
    return out


def _as_int(v: Any, where: str) -> int:
    if isinstance(v, bool):
        raise HParamsError(f"{where}: must be an integer, got a boolean {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, (float, str)):
        try:
            f = float(v.strip()) if isinstance(v, str) else v
        except ValueError:
            f = None
        if f is not None and math.isfinite(f) and float(f).is_integer():
            return int(f)
    raise HParamsError(f"{where}: must be an integer, got {_tname(v)} {v!r}")


def _as_bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise HParamsError(f"{where}: must be true or false, got {_tname(v)} {v!r}")
    return v


def _as_str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise HParamsError(f"{where}: must be a string, got {_tname(v)} {v!r}")
    return v


def _as_int_list(v: Any, where: str) -> list:
    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        raise HParamsError(f"{where}: must be a list of integers, e.g. [{v}]; got {_tname(v)} {v!r}")
    if not isinstance(v, (list, tuple)):
        raise HParamsError(f"{where}: must be a list of integers, e.g. [3, 4, 5]; got {_tname(v)} {v!r}")
    return [_as_int(x, f"{where}, item {i}") for i, x in enumerate(v)]


def _as_pairs(v: Any, where: str) -> list:
    example = "e.g. [[10, 5]]"
    if not isinstance(v, (list, tuple)):
        raise HParamsError(f"{where}: must be a list of pairs of integers, {example}; got {v!r}")
    out = []
    for i, pair in enumerate(v):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise HParamsError(f"{where}, item {i}: must be a pair of integers, {example}; got {pair!r}")
        out.append([_as_int(pair[0], f"{where}, item {i}"), _as_int(pair[1], f"{where}, item {i}")])
    return out


_COERCE = {int: _as_int, float: _as_float, bool: _as_bool, str: _as_str}


def _coercer(hint: Any, name: str) -> Callable[[Any, str], Any]:
    """The coercion for a field of type `hint`; a TypeError for a type no hparams file can hold."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _coercer(next(a for a in args if a is not type(None)), name)
        return lambda v, where: None if v is None else inner(v, where)
    if hint in _COERCE:
        return _COERCE[hint]
    if typing.get_origin(hint) is list and args == (int,):
        return _as_int_list
    if typing.get_origin(hint) is list and args == (list[int],):
        return _as_pairs
    raise TypeError(f"hparams key {name!r}: type {hint!r} is not one an hparams file holds (int, float, bool, str, "
                    "Optional[...] of them, list[int] or list[list[int]])")


@functools.lru_cache(maxsize=None)
def declared(cls: type) -> dict[str, tuple[Callable[[Any, str], Any], Optional[Check]]]:
    """Key → (coercion, check) for every field of the dataclass `cls` but `extras`, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: (_coercer(hints[f.name], f.name), f.metadata.get("check"))
            for f in dataclasses.fields(cls) if f.name != "extras"}


def checked(cls: type, values: dict, source: str) -> dict:
    """`values` (keys of `cls`) coerced by their types and checked by their rules; the first bad one
    raises an HParamsError naming `source` and the key."""
    keys = declared(cls)
    out = {}
    for name, (coerce, check) in keys.items():
        if name not in values:
            continue
        where = f'{source}, key "{name}"'
        out[name] = coerce(values[name], where)
        problem = check(out[name]) if check else None
        if problem:
            raise HParamsError(f"{where}: {problem}")
    return out
