"""The one rule for a name that becomes part of a path (the statistics' model name and dataset name):
a single plain entry of the directory it is joined to, never a way out of it."""
from __future__ import annotations

from typing import Optional


def unsafe(name) -> Optional[str]:
    """Why `name` cannot be one entry of a directory, or None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}, which names a directory, not an entry of one"
    if "/" in name or "\\" in name or "\0" in name:
        return "holds a path separator; it must be a plain name, not a path"
    return None


def check_name(name, what: str, fix: str, error: type[ValueError] = ValueError) -> str:
    """`name` itself when it is a plain name; else `error` naming `what` and how to `fix` it."""
    why = unsafe(name)
    if why is not None:
        raise error(f"{what} {name!r} {why}; {fix}")
    return name
