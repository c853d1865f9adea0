"""Shipped world models: deterministic archives, unpacking instead of training, the rebuild check."""
from __future__ import annotations

import io
import json
import lzma
import tarfile

import pytest

from massedit.cli import main as cli_main
from massedit.world import prebuilt
from massedit.world.build import build_args, build_world, is_complete
from massedit.world.generate import DEFAULT_RELATIONS
from massedit.world.train import preset

SHIPPED = prebuilt.PREBUILT_DIR / "gpt2-default.tar.xz"


def _default_args() -> dict:
    cfg = preset("gpt2")
    return build_args(2000, "gpt2", 0, False, cfg, 2000, list(DEFAULT_RELATIONS))


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("worlds") / "quick"
    build_world(out, quick=True, threads=1)
    return out


def test_pack_is_deterministic_and_unpacks(quick_world, tmp_path):
    a = prebuilt.pack(quick_world, tmp_path / "a.tar.xz")
    build = json.loads((quick_world / "build.json").read_text())
    # A second run of the same build differs only in its clock readings.
    (quick_world / "build.json").write_text(json.dumps({**build, "built_at": "another time",
                                                        "seconds": {"total": 1.0}}, indent=1))
    try:
        b = prebuilt.pack(quick_world, tmp_path / "b.tar.xz")
    finally:
        (quick_world / "build.json").write_text(json.dumps(build, indent=1))
    assert a == b == prebuilt.sha256(tmp_path / "a.tar.xz")
    assert prebuilt.read_build_json(tmp_path / "a.tar.xz")["args"] == build["args"]
    unpacked = prebuilt.unpack(tmp_path / "a.tar.xz", tmp_path / "u")
    assert unpacked["recall"] == build["recall"]
    for f in (quick_world / "model").iterdir():
        assert (tmp_path / "u" / "model" / f.name).read_bytes() == f.read_bytes()


def test_unpack_refuses_members_outside_the_model(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (("build.json", b"{}"), ("../evil", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(lzma.compress(raw.getvalue()))
    with pytest.raises(ValueError, match="unexpected member"):
        prebuilt.unpack(bad, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_the_default_world_is_unpacked_not_trained(tmp_path):
    assert prebuilt.find(_default_args()) == SHIPPED
    info = build_world(tmp_path / "w", threads=1)
    assert info["prebuilt"]["archive"] == SHIPPED.name and is_complete(tmp_path / "w")
    assert info["recall"]["rewrite"]["full_top1"] >= 0.95
    # Reused as any build is.
    assert build_world(tmp_path / "w", threads=1)["cached"] is True


def test_pack_cli_errors(tmp_path, capsys):
    assert cli_main(["world", "pack", "--world", str(tmp_path), "--out", str(tmp_path / "x.tar.xz")]) == 2
    assert "is not a world build" in capsys.readouterr().err
    assert cli_main(["world", "pack", "--world", str(tmp_path), "--out", str(tmp_path / "x.zip")]) == 2
    assert ".tar.xz" in capsys.readouterr().err


@pytest.mark.slow
def test_a_rebuild_packs_to_the_shipped_bytes(tmp_path):
    """The command README gives rebuilds the shipped model bit for bit (same thread count, same
    kind of machine and library versions as recorded in its build.json): about 30 minutes."""
    shipped = prebuilt.read_build_json(SHIPPED)
    build_world(tmp_path / "w", threads=shipped["threads"], train=True)
    assert prebuilt.pack(tmp_path / "w", tmp_path / "rebuilt.tar.xz") == prebuilt.sha256(SHIPPED)
