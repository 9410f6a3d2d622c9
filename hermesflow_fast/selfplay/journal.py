"""Append-only JSONL journals: a stage writes one record per line as it finishes it, so a crashed or SIGKILLed stage
restarts where it stopped, with no record lost or written twice.

    j = Journal(path)          # reads what is there; a torn last line (killed mid-write) is cut off
    if rid not in j: j.append({"id": rid, ...})     # flushed and fsynced per record
    j.records()                 # {id: record}, joins are always by id

Sharded by rank for ``--nproc N``: ``Journal(path, rank=r)`` writes ``path`` with ``.rank{r}`` before the suffix;
``merge_shards(path, world)`` joins them by id into ``path`` (identical content to a one-process run when every
record's result depends only on the record and the seed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hermesflow_fast.io import append_synced, read_jsonl, write_atomic

__all__ = ["Journal", "merge_shards", "shard_path"]


def shard_path(path: Path, rank: int | None) -> Path:
    return path if rank is None else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


class Journal:
    def __init__(self, path: str | os.PathLike, rank: int | None = None):
        self.path = shard_path(Path(path), rank)
        self._records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for n, rec in read_jsonl(self.path, tail="cut"):  # a torn last line is cut off
                if "id" not in rec:
                    raise ValueError(f"{self.path}:{n}: record without an id")
                self._records[str(rec["id"])] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __contains__(self, rid: str) -> bool:
        return str(rid) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._records.values())

    def records(self) -> dict[str, dict[str, Any]]:
        return dict(self._records)

    def append(self, record: dict[str, Any]) -> None:
        rid = str(record["id"])
        if rid in self._records:
            raise ValueError(f"{self.path}: record {rid!r} is already written")
        append_synced(self.path, json.dumps(record, separators=(",", ":")) + "\n")
        self._records[rid] = record


def merge_shards(path: str | os.PathLike, world_size: int, order: list[str] | None = None) -> Journal:
    """Join the per-rank journals of ``path`` into ``path`` by id (``order``: the ids' order, else sorted)."""
    path = Path(path)
    merged: dict[str, dict] = {}
    for r in range(world_size):
        for rec in Journal(path, rank=r):
            rid = str(rec["id"])
            if rid in merged:
                raise ValueError(f"record {rid!r} appears in two rank shards of {path}")
            merged[rid] = rec
    ids = [i for i in (order or sorted(merged)) if i in merged]
    write_atomic(path, "".join(json.dumps(merged[i], separators=(",", ":")) + "\n" for i in ids))
    return Journal(path)
