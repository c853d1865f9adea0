"""Output locations are checked before any work: a run must not compute for minutes and then fail
to write its result. Nothing is created here; the checks only look."""
from __future__ import annotations

import os
from pathlib import Path


class NotWritableError(ValueError):
    """An output path cannot be written; the message names it and the flag it came from."""


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_dir(path, flag: str) -> None:
    """`path` is a directory this process can write into, or one it can create."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotWritableError(f"{flag} {path}: exists and is not a directory; give a directory")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise NotWritableError(f"{flag} {path}: {base} is a file, so the directory cannot be created there")
    if not os.access(base, os.W_OK | os.X_OK):
        raise NotWritableError(f"{flag} {path}: {base} is not writable; choose a location you can write to")


def check_file(path, flag: str) -> None:
    """`path` is a file this process can (over)write, or create."""
    path = Path(path)
    if path.is_dir():
        raise NotWritableError(f"{flag} {path}: is a directory; give a file name, e.g. {path / 'out.json'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise NotWritableError(f"{flag} {path}: the file is not writable; choose another file")
        return
    check_dir(path.parent, flag)
