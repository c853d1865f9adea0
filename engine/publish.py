"""Where outputs go: checked before any work, published all at once (commands and `world build` alike).

Output locations are checked first (`check_dir`, `check_file`, `check_out`): a run must not
compute for minutes and then fail to write its result. The checks create nothing; they only look.

Output directories appear all at once: a run writes into a staging directory beside the
target and publishes it in one step, so an interrupted run (exception, SIGINT, SIGKILL) never
leaves a finished-looking output, and an edit written over its own model (`--out` = `--model
--force`) keeps the original until the new one is complete.

Publishing a new directory is one rename. Over an existing one, the staging directory first
receives hard links to the entries the run does not own (so `--force` still writes *into* the
directory: the user's other files stay; a file the run owns but did not write this time, like
an older run's plot, is dropped rather than left stale), then the two are swapped with one atomic
renameat2(RENAME_EXCHANGE) where the platform has it, else with two renames a moment apart.
A run killed before publishing leaves only a hidden `.NAME.massedit-staging-*` directory beside
the target; the next run that claims the target removes it.

One run at a time writes a target: `claim` creates the lock file `.NAME.massedit-lock` beside it
exclusively (O_CREAT|O_EXCL, holding the owner's pid) for the whole run, so a second run on the same
--out is refused before any work instead of silently replacing the first one's result. A lock whose
pid is no longer running (a killed run) is stale and taken over.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from massedit.model import parallel


class NotWritableError(ValueError):
    """An output path cannot be written; the message names it and the flag it came from."""

# A model saved into the staging directory supersedes the old directory's weight files, which may
# be named or sharded differently (transformers' save_pretrained removes them the same way).
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                          r"(\.index\.json)?$")


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that cannot be published, before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; choose a new directory or pass --force to write into it")
    real, cwd = Path(os.path.realpath(out)), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"--out {out} is the current directory or contains it, and is replaced as a whole when "
                         "the run finishes; run from another directory or choose another --out")
    check_dir(out, "--out")
    # The staging directory and the lock are created beside --out, so its parent must take them too.
    parent = _nearest_existing(real.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NotWritableError(f"--out {out}: its parent {parent} is not writable, and the run writes beside --out "
                               "before publishing it; choose an --out in a directory you can write to")


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


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(stage: Path, out: Path, owned: frozenset) -> None:
    if not out.exists():
        _fsync_tree(stage)
        os.rename(stage, out)
        return
    os.chmod(stage, stat.S_IMODE(out.stat().st_mode))
    replaces_weights = (stage / "config.json").exists()
    for entry in out.iterdir():
        target = stage / entry.name
        if (target.exists() or target.is_symlink() or entry.name in owned
                or (replaces_weights and _WEIGHT_FILE.match(entry.name))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        else:
            _link_or_copy(str(entry), str(target))
    _fsync_tree(stage)
    if not _exchange(stage, out):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.massedit-staging-"))
        os.rename(out, old / out.name)
        try:
            os.rename(stage, out)
        except BaseException:
            os.rename(old / out.name, out)
            raise
        stage = old
    shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged(out, owned: Iterable[str] = ()) -> Iterator[Path]:
    """An empty directory beside `out` to write the outputs into; published as `out` when the
    block finishes, removed (and `out` untouched) when it raises or is interrupted. `owned`: the
    names this kind of run writes, never carried over from an older `out`."""
    out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.massedit-staging-"))
    # mkdtemp makes 0700; the published directory should look like one the user made.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(stage, 0o777 & ~mask)
    try:
        yield stage
        _publish(stage, out, frozenset(owned))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.massedit-lock"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _take_lock(lock: Path, out: Path, flag: str) -> None:
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _running(pid):
                raise ValueError(f"{flag} {out} is being written by another massedit run (pid {pid}, lock {lock}); "
                                 "wait for it to finish or choose another directory") from None
            try:  # stale: its run was killed
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise ValueError(f"{flag} {out}: cannot take the lock {lock}; remove it if no massedit run is writing there")


@contextmanager
def claim(out, flag: str = "--out") -> Iterator[None]:
    """Hold `out` for this run: refused (ValueError) while another live run holds it. Staging
    directories a killed run left beside `out` are removed once the claim is held. Under torchrun
    only rank 0, the one that publishes, takes it."""
    if not parallel.world().main:
        yield
        return
    out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(out)
    _take_lock(lock, out, flag)
    try:
        for leftover in out.parent.glob(f".{out.name}.massedit-staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        yield
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
