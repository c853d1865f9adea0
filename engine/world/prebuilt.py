"""World models that ship with the project, so the default world needs no training.

Training the default world's model takes longer than a first run should (about 40 minutes on two
CPU cores). Its result ships as one archive, `prebuilt/<name>.tar.xz`, holding the model directory
(config, weights, tokenizer) and the build.json of the build that trained it. `build_world` uses
an archive whose build arguments equal the ones asked for, and trains otherwise (or with
train=True). The world's data files are not in the archive: the generator writes them again,
byte for byte, in a second.

Archives are written deterministically (sorted members, zeroed times and owners, fixed xz
settings), so the same model directory always gives the same bytes, and a rebuild with the
recorded thread count on the same kind of machine can be checked against the shipped file by hash
(`massedit world build --train` then `massedit world pack`; tests/test_world_prebuilt.py, slow).
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path
from typing import Optional

PREBUILT_DIR = Path(__file__).with_name("prebuilt")
BUILD_MEMBER = "build.json"
MODEL_MEMBER = "model"
_XZ_PRESET = 6
# Entries of build.json that differ between two runs of the same build (clock readings), left out
# of the archive so that a rebuild packs to the same bytes.
_VOLATILE = ("built_at", "seconds")
_VOLATILE_TRAINING = ("data_seconds", "train_seconds")


def _stable_build_json(build: dict) -> bytes:
    stable = {k: v for k, v in build.items() if k not in _VOLATILE}
    if isinstance(stable.get("training"), dict):
        stable["training"] = {k: v for k, v in stable["training"].items() if k not in _VOLATILE_TRAINING}
    return (json.dumps(stable, indent=1) + "\n").encode("utf-8")


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def pack(world_dir, out_file) -> str:
    """Write the model directory and build.json of a world build as one archive; its sha256."""
    src = Path(world_dir)
    model = src / MODEL_MEMBER
    build = src / BUILD_MEMBER
    if not build.is_file() or not model.is_dir():
        raise ValueError(f"{src} is not a world build (it needs build.json and model/)")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        # build.json first: reading the build arguments stops after one member.
        tar.addfile(*_member(BUILD_MEMBER, _stable_build_json(json.loads(build.read_text(encoding="utf-8")))))
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            tar.addfile(*_member(f"{MODEL_MEMBER}/{path.relative_to(model).as_posix()}", path.read_bytes()))
    data = lzma.compress(raw.getvalue(), preset=_XZ_PRESET)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(out)
    return hashlib.sha256(data).hexdigest()


def read_build_json(archive) -> dict:
    """The build.json an archive carries."""
    with tarfile.open(archive, mode="r:xz") as tar:
        first = tar.next()
        if first is None or first.name != BUILD_MEMBER:
            raise ValueError(f"{archive} is not a world archive (its first member is not {BUILD_MEMBER})")
        return json.loads(tar.extractfile(first).read().decode("utf-8"))


def find(args: dict) -> Optional[Path]:
    """The shipped archive built with exactly these build arguments, if any."""
    for archive in sorted(PREBUILT_DIR.glob("*.tar.xz")):
        if read_build_json(archive).get("args") == args:
            return archive
    return None


def unpack(archive, dest) -> dict:
    """Extract an archive's model directory into dest/model; returns its build.json."""
    dest = Path(dest)
    with tarfile.open(archive, mode="r:xz") as tar:
        build = None
        for member in tar:
            if member.name == BUILD_MEMBER:
                build = json.loads(tar.extractfile(member).read().decode("utf-8"))
                continue
            parts = Path(member.name).parts
            if not member.isfile() or parts[0] != MODEL_MEMBER or ".." in parts or Path(member.name).is_absolute():
                raise ValueError(f"{archive}: unexpected member {member.name!r}")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    if build is None:
        raise ValueError(f"{archive} holds no {BUILD_MEMBER}")
    return build


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
