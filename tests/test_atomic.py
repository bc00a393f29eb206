"""Atomic writes: a failed write leaves the old file and no temporary."""

import pytest

from camfunc._util.atomic import write_atomic, write_text_atomic


def test_write_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "out.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_a_failing_writer_keeps_the_old_content(tmp_path):
    path = tmp_path / "out.txt"
    write_text_atomic(path, "kept")

    def broken(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
