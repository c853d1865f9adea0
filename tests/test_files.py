"""massedit.files.written: the whole file or the old one, never half of either."""
from __future__ import annotations

import os

import pytest

from massedit.files import write_text, written


def test_written_replaces_the_file_whole_with_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_text(path, "old")
    with written(path) as tmp:
        assert tmp.parent == path.parent and tmp != path and tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert path.read_text() == "old"  # not replaced until the block ends
    assert path.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_an_error_while_writing_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with written(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
