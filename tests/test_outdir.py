"""Staged output directories (massedit.publish): published whole, or not at all."""
from __future__ import annotations

import pytest

import massedit.publish as outdir
from massedit.publish import check_out, staged


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_new_directory_appears_only_when_the_block_finishes(tmp_path):
    out = tmp_path / "a" / "out"
    with staged(out) as stage:
        (stage / "report.json").write_text("{}")
        assert not out.exists() and stage.parent == out.parent and stage.name.startswith(".out.massedit-staging-")
    assert _listing(out) == ["report.json"]
    assert _listing(out.parent) == ["out", "out/report.json"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_existing_directory_keeps_foreign_entries_and_drops_superseded_ones(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    (out / "stats" / "deep").mkdir(parents=True)
    (out / "stats" / "deep" / "cov.npz").write_text("cached")
    (out / "notes.txt").write_text("mine")
    (out / "metrics.png").write_text("an older run's plot")
    (out / "report.json").write_text("old")
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json"):
        (out / shard).write_text("old weights")
    (out / "link").symlink_to("notes.txt")
    with staged(out, owned=("report.json", "metrics.png")) as stage:
        (stage / "config.json").write_text("{}")
        (stage / "model.safetensors").write_text("new weights")
        (stage / "report.json").write_text("new")
    assert _listing(out) == ["config.json", "link", "model.safetensors", "notes.txt", "report.json", "stats",
                             "stats/deep", "stats/deep/cov.npz"]
    assert (out / "report.json").read_text() == "new" and (out / "link").read_text() == "mine"
    assert (out / "stats" / "deep" / "cov.npz").read_text() == "cached"
    assert _listing(tmp_path) == ["out"] + [f"out/{name}" for name in _listing(out)]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_leaves_the_directory_as_it_was(failure, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    with pytest.raises(type(failure)):
        with staged(out) as stage:
            (stage / "report.json").write_text("half")
            raise failure
    assert _listing(tmp_path) == ["out", "out/report.json"] and (out / "report.json").read_text() == "old"


def test_failure_while_swapping_restores_the_old_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    real_rename, calls = outdir.os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new directory into place
            raise OSError("injected")
        real_rename(src, dst)

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    monkeypatch.setattr(outdir.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        with staged(out) as stage:
            (stage / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "old"


def test_check_out_refuses_what_cannot_be_published(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_out(tmp_path / "file", force=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty.*--force"):
        check_out(tmp_path / "full", force=False)
    check_out(tmp_path / "full", force=True)
    monkeypatch.chdir(tmp_path / "full")
    with pytest.raises(ValueError, match="current directory"):
        check_out(tmp_path / "full", force=True)
    with pytest.raises(ValueError, match="current directory"):
        check_out(tmp_path, force=True)
