"""hermesflow_fast.io: atomic writes leave the old file or the new one (never a temp file), fsynced appends, and
JSONL reading with file:line errors and the three ways of treating a torn last line.

    python -m pytest -q tests/test_io.py
"""

import os

import pytest

from hermesflow_fast.io import append_synced, atomic_path, decode_text, fsync_path, read_jsonl, read_lines, write_atomic


class _Mine(ValueError):
    pass


def test_fsync_path_takes_files_and_folders(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    fsync_path(f)
    fsync_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_path_replaces_on_success(tmp_path, fsync):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target, fsync=fsync) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp") and tmp.name.startswith(".out.bin.")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.txt"):
        raise RuntimeError("nothing written")
    assert not (tmp_path / "new.txt").exists()


def test_write_atomic_str_and_bytes(tmp_path):
    assert write_atomic(tmp_path / "t.txt", "héllo\n") == tmp_path / "t.txt"
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
    write_atomic(tmp_path / "b.bin", b"\x00\xff", fsync=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "t.txt"]


def test_append_synced(tmp_path):
    f = tmp_path / "j.jsonl"
    append_synced(f, "a\n")
    append_synced(f, "b\nc\n")
    assert f.read_text() == "a\nb\nc\n"


def test_decode_text_names_file_line_and_byte():
    assert decode_text("é".encode(), "f") == "é"
    with pytest.raises(_Mine, match=r"^f\.txt:2: not UTF-8 text \(byte 3: invalid start byte\); hint$"):
        decode_text(b"ab\n\xffc", "f.txt", error=_Mine, hint="; hint")
    assert decode_text(b"a\xff", "f", errors="replace") == "a\ufffd"


def test_read_lines_numbers_from_one_and_skips_blank_lines(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes(b"a\r\n\n  \nb\rc\nd")
    assert read_lines(f) == [(1, "a"), (4, "b"), (5, "c"), (6, "d")]


@pytest.mark.parametrize("tail", ["keep", "skip", "cut"])
def test_read_lines_torn_tail(tmp_path, tail):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id"')
    torn = []
    lines = read_lines(f, tail=tail, on_torn=lambda: torn.append(1))
    assert lines[:2] == [(1, '{"id": 1}'), (2, '{"id": 2}')]
    assert lines[2:] == ([(3, '{"id"')] if tail == "keep" else [])
    assert torn == ([] if tail == "keep" else [1])
    assert f.read_bytes() == (b'{"id": 1}\n{"id": 2}\n' if tail == "cut" else b'{"id": 1}\n{"id": 2}\n{"id"')
    torn.clear()
    f.write_bytes(b'{"id": 1}\n')
    assert read_lines(f, tail=tail, on_torn=lambda: torn.append(1)) == [(1, '{"id": 1}')] and torn == []


def test_read_jsonl_values_and_errors(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"id": "a"}\n\n[1, 2]\n7\n')
    assert read_jsonl(f) == [(1, {"id": "a"}), (3, [1, 2]), (4, 7)]
    f.write_text('{"id": "a"}\n{"id": oops}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not valid JSON \(Expecting value at column 8\)"):
        read_jsonl(f)
    with pytest.raises(_Mine, match=r"r\.jsonl:2: not JSON \("):
        read_jsonl(f, invalid="not JSON", error=_Mine)
    f.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(_Mine, match=r"r\.jsonl:2: not UTF-8 text \(byte 20: .*\); see"):
        read_jsonl(f, error=_Mine, hint="; see")
    assert read_jsonl(f, errors="replace")[1] == (2, {"id": "\ufffd"})
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
