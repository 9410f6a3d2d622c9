"""Files: fsync, atomic writes (a temp file renamed over the target) and JSONL reading with file:line errors.

    with atomic_path(path, fsync=True) as tmp:       # write tmp by any means; on success it replaces path
        save_file(tensors, str(tmp))
    write_atomic(path, text)                          # the same for a str or bytes
    append_synced(path, line)                         # one fsynced append (journals, indexes)
    for lineno, obj in read_jsonl(path, error=UserError):
        ...                                           # a bad line is UserError("path:lineno: not valid JSON (…)")

Atomic: a reader of ``path`` sees the old file or the new one, never half of one. The temp file sits in the same
folder (same file system, so ``os.replace`` is atomic), is named ``.{name}.{pid}.tmp`` (hidden, one per process, and
``*.tmp`` for cleanup globs) and is removed when the write fails. ``fsync=True`` also flushes the file's bytes and
then the folder's new entry to disk, for files that must outlive a power cut, not only a killed process.

JSONL: UTF-8, one JSON value per line; lines end at ``\\n``, ``\\r\\n`` or ``\\r``, numbered from 1, blank ones skipped.
A last line without its newline is torn (a writer killed mid-append): kept, skipped, or cut off the file.

    python -m pytest -q tests/test_io.py
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

__all__ = ["append_synced", "atomic_path", "decode_text", "fsync_path", "read_jsonl", "read_lines", "write_atomic"]

Tail = Literal["keep", "skip", "cut"]


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's bytes, or a folder's entries, to disk; a file system that refuses fsync (some do on folders)
    is not an error."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temp path beside ``path`` to write; when the block ends without an exception the temp file replaces
    ``path`` (fsynced first, and the folder after, with ``fsync``). On an exception the temp file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        fsync_path(path.parent)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` (str as UTF-8, or bytes) to ``path`` atomically (see ``atomic_path``); returns ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path


def append_synced(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path`` in one write, flushed and fsynced before returning: a kill loses at most
    the line being written, which readers see as a torn last line (``read_lines``' ``tail``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def decode_text(data: bytes, path: str | os.PathLike, *, encoding: str = "utf-8", errors: str = "strict",
                error: type[Exception] = ValueError, hint: str = "") -> str:
    """``data`` (the bytes of ``path``) as text; bytes that do not decode raise
    ``error("{path}:{line}: not UTF-8 text (byte {offset}: {reason}){hint}")``, unless ``errors`` (as for
    ``bytes.decode``: "replace", …) says what to do with them."""
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {exc.start}: {exc.reason}){hint}") from exc


def read_lines(path: str | os.PathLike, *, tail: Tail = "keep", on_torn: Callable[[], None] | None = None,
               errors: str = "strict", error: type[Exception] = ValueError, hint: str = "") -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file, in file order.

    ``tail``: a last line without its newline (torn: a writer killed mid-append) is kept as any other line ("keep"),
    skipped ("skip"), or skipped and cut off the file ("cut"); ``on_torn()`` is called when one is skipped or cut.
    ``errors``, ``error`` and ``hint``: undecodable bytes, as ``decode_text``."""
    data = Path(path).read_bytes()
    if tail != "keep":
        end = data.rfind(b"\n") + 1  # everything up to the last complete line
        if end < len(data):
            if tail == "cut":
                with open(path, "r+b") as f:
                    f.truncate(end)
            if on_torn is not None:
                on_torn()
            data = data[:end]
    text = decode_text(data, path, errors=errors, error=error, hint=hint)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [(n, line) for n, line in enumerate(lines, 1) if line.strip()]


def read_jsonl(path: str | os.PathLike, *, invalid: str = "not valid JSON", tail: Tail = "keep",
               on_torn: Callable[[], None] | None = None, errors: str = "strict", error: type[Exception] = ValueError,
               hint: str = "") -> list[tuple[int, Any]]:
    """(line number, parsed value) of the non-blank lines of a JSONL file (``read_lines``); a line that is not JSON
    raises ``error("{path}:{line}: {invalid} ({what} at column {column})")``."""
    out = []
    for n, line in read_lines(path, tail=tail, on_torn=on_torn, errors=errors, error=error, hint=hint):
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{n}: {invalid} ({exc.msg} at column {exc.colno})") from exc
    return out
