"""Files written whole or not at all: statistics, deltas, ledgers, traces and benchmark results are
rewritten by long runs that can be interrupted, and a reader must never find half a file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def written(path: Union[str, Path]) -> Iterator[Path]:
    """A fresh temporary path beside `path` (".NAME.XXXX.tmp": a writer that picks a format from the
    suffix must be told it) to write to; on leaving without an error it replaces `path`, with a
    normal file's permissions; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's are 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Union[str, Path], text: str) -> Path:
    with written(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
