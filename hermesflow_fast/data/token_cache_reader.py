"""Reading a token cache (made by ``tokenize_images``, data/token_cache.py): its files, their checks, ``TokenCache``.

    out_dir/cache.json       tokenizer description: num_codes, grid, tokens_per_image, dtype, …   (read_meta)
    out_dir/index.jsonl      {"id", "shard", "row"} per record                                   (read_index)
    out_dir/shards.jsonl     {"shard", "rows", "bytes", "sha256"} per shard file                  (read_shard_records)
    out_dir/shard-*.safetensors   "ids": (n, N) codes, the rows' record ids in the metadata       (parse_shard)

Every read is checked: a shard that is missing, has another size or sha256 than shards.jsonl records,
or is not readable is a ``TokenCacheError`` naming the file (and saying that rerunning ``hermesflow tokenize`` on the
same folder re-encodes it), and a row whose codes are not integers in [0, num_codes) is one naming the record id and
the shard. ``TokenCache.row_problem(id)`` reports the same for validation (data/validate.py), one scan per shard.

    python -m pytest -q tests/data/test_token_cache.py
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hermesflow_fast.errors import UserError
from hermesflow_fast.io import read_jsonl

__all__ = ["INDEX_FILE", "META_FILE", "SHARDS_FILE", "TokenCache", "TokenCacheError", "codes_problem"]

META_FILE, INDEX_FILE, SHARDS_FILE = "cache.json", "index.jsonl", "shards.jsonl"


class TokenCacheError(UserError):
    """A token cache (or tokenize source) that cannot be used as it is; the message names the file, id or shard."""


def parse_shard(data: bytes) -> tuple[Tensor, dict[str, Any]]:
    """A shard's bytes → (its ``ids`` tensor, its safetensors header); ValueError saying what is wrong."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad or truncated file
        raise ValueError(f"not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if "ids" not in tensors:
        raise ValueError(f"no 'ids' tensor (has {sorted(tensors)[:5]})")
    n = int.from_bytes(data[:8], "little")
    return tensors["ids"], json.loads(data[8 : 8 + n])


def _read_cache_jsonl(file: Path, repair: bool) -> list[tuple[int, Any]]:
    """(line number, value) of the non-blank lines of a cache's JSONL file (absent: none); a torn last line (no
    newline: a kill mid-append) is ignored, and cut off if ``repair``."""
    if not file.is_file():
        return []
    return read_jsonl(file, tail="cut" if repair else "skip", error=TokenCacheError,
                      hint="; the cache is damaged, tokenize into a fresh folder")


def read_shard_records(out: Path, repair: bool) -> dict[str, dict[str, Any]]:
    """shards.jsonl as {shard: {"shard", "rows", "bytes", "sha256"}} (the last line of a shard wins; absent: {})."""
    file = out / SHARDS_FILE
    records: dict[str, dict[str, Any]] = {}
    for lineno, r in _read_cache_jsonl(file, repair):
        try:
            r = {"shard": str(r["shard"]), "rows": int(r["rows"]), "bytes": int(r["bytes"]),
                 "sha256": str(r["sha256"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenCacheError(f"{file}:{lineno}: not a shard line {{shard, rows, bytes, sha256}} ({exc})") from exc
        records[r["shard"]] = r
    return records


def read_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        for key in ("num_codes", "tokens_per_image"):
            int(meta[key])
        if len(meta["grid"]) != 2 or meta["dtype"] not in ("uint16", "int32"):
            raise ValueError(f"grid {meta['grid']!r} or dtype {meta['dtype']!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TokenCacheError(f"{file}: not a token cache description ({type(exc).__name__}: {exc})") from exc
    return meta


def read_index(out: Path, repair: bool) -> list[dict[str, Any]]:
    """The index entries; a torn last line (no newline: a kill mid-append) is ignored, and cut off if ``repair``."""
    file = out / INDEX_FILE
    entries, seen = [], {}
    for lineno, e in _read_cache_jsonl(file, repair):
        try:
            rid, shard, row = e["id"], e["shard"], int(e["row"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenCacheError(f"{file}:{lineno}: not an index line {{id, shard, row}} ({exc})") from exc
        if rid in seen:
            raise TokenCacheError(f"{file}:{lineno}: id {rid!r} is already indexed on line {seen[rid]}")
        seen[rid] = lineno
        entries.append({"id": rid, "shard": shard, "row": row})
    return entries


# ---------------------------------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------------------------------


def _bad_rows(ids: Tensor, num_codes: int) -> dict[int, str]:
    """{row: what is wrong} for the rows of ``ids`` (n, N) holding a NaN/inf, a non-integer or a code outside
    [0, num_codes); each message names the first bad position and value."""
    if ids.is_floating_point():
        x = ids.to(torch.float64)
        finite = torch.isfinite(x)
        bad = ~finite | (x != x.round()) | (finite & ((x < 0) | (x >= num_codes)))
    elif ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        return dict.fromkeys(range(ids.shape[0]), f"codes are {ids.dtype}, not integers")
    else:
        x = ids.to(torch.int64)
        bad = (x < 0) | (x >= num_codes)
    out: dict[int, str] = {}
    for r in bad.any(dim=1).nonzero().flatten().tolist():
        pos = int(bad[r].nonzero()[0])
        v = x[r, pos].item()
        n = int(bad[r].sum())
        if isinstance(v, float) and not math.isfinite(v):
            what = f"{v} at position {pos}"
        elif isinstance(v, float) and v != round(v):
            what = f"non-integer code {v} at position {pos}"
        else:
            what = f"code {int(v)} at position {pos} is outside the codebook [0, {num_codes})"
        out[r] = what + (f" ({n} bad codes in the row)" if n > 1 else "")
    return out


def codes_problem(codes: Tensor, num_codes: int) -> str | None:
    """None when ``codes`` (N,) are integers in [0, num_codes), else what is wrong (first bad position named)."""
    return _bad_rows(codes.reshape(1, -1), num_codes).get(0)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


class TokenCache:
    """Read-only view of a token cache: ``cache[id]`` -> (N,) int64 codes; the last ``max_shards`` shards read stay
    in memory. Opening checks that every indexed shard exists with the size shards.jsonl records; reading a shard
    checks its sha256, that it parses and its shape; reading a row checks its codes. Each failure is a
    ``TokenCacheError`` naming the shard (and the record id)."""

    def __init__(self, out_dir: str | os.PathLike, max_shards: int = 8) -> None:
        self.out_dir = Path(out_dir)
        meta_file = self.out_dir / META_FILE
        if not self.out_dir.is_dir():
            raise TokenCacheError(f"token cache {self.out_dir} does not exist (make it with hermesflow tokenize)")
        if not meta_file.is_file():
            raise TokenCacheError(f"{self.out_dir} is not a token cache: {META_FILE} not found (make one with "
                                  f"hermesflow tokenize)")
        self.meta: dict[str, Any] = read_meta(meta_file)
        self.num_codes = int(self.meta["num_codes"])
        self.tokens_per_image = int(self.meta["tokens_per_image"])
        self.grid = tuple(self.meta["grid"])
        self._where = {e["id"]: (e["shard"], e["row"]) for e in read_index(self.out_dir, repair=False)}
        self._records = read_shard_records(self.out_dir, repair=False)
        self._rows: dict[str, int] = {}
        for shard, row in self._where.values():
            self._rows[shard] = max(self._rows.get(shard, 0), row + 1)
        for shard in self._rows:
            file, rec = self.out_dir / shard, self._records.get(shard)
            if not file.is_file():
                raise self._damaged(shard, f"is missing ({INDEX_FILE} refers to it)")
            if rec is not None and file.stat().st_size != rec["bytes"]:
                raise self._damaged(shard, f"has {file.stat().st_size:,} bytes, {rec['bytes']:,} when written "
                                           f"(truncated or overwritten)")
        self._shards: OrderedDict[str, Tensor] = OrderedDict()
        self._verified: set[str] = set()
        self._bad: dict[tuple[str, int], dict[int, str]] = {}
        self._max_shards = max(1, max_shards)

    def _damaged(self, shard: str, what: str) -> TokenCacheError:
        return TokenCacheError(f"{self.out_dir / shard} {what}; rerun hermesflow tokenize with --out {self.out_dir} "
                               f"to re-encode its records")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, rid: object) -> bool:
        return rid in self._where

    def ids(self) -> list[str]:
        """Record ids in the order they were written."""
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def shard_of(self, rid: str) -> Path:
        """The shard file holding ``rid``."""
        return self.out_dir / self._locate(rid)[0]

    def row_problem(self, rid: str, num_codes: int | None = None) -> str | None:
        """None when the codes of ``rid`` are integers in [0, num_codes) (default: the cache's tokenizer's), else
        what is wrong, naming the shard file and row. Each shard is scanned once (per ``num_codes``)."""
        shard, row = self._locate(rid)
        bad = self._row_bad(shard, row, self.num_codes if num_codes is None else int(num_codes))
        return None if bad is None else f"{self.out_dir / shard} row {row}: {bad}"

    def __getitem__(self, rid: str) -> Tensor:
        shard, row = self._locate(rid)
        bad = self._row_bad(shard, row, self.num_codes)
        if bad is not None:
            raise TokenCacheError(f"token cache record {rid!r} ({self.out_dir / shard} row {row}): {bad}")
        return self._shard(shard)[row].to(torch.int64)  # (N,)

    def _row_bad(self, shard: str, row: int, num_codes: int) -> str | None:
        if (shard, num_codes) not in self._bad:  # one vectorised scan per shard; the verdicts outlive the LRU
            self._bad[(shard, num_codes)] = _bad_rows(self._shard(shard), num_codes)
        return self._bad[(shard, num_codes)].get(row)

    def _locate(self, rid: str) -> tuple[str, int]:
        try:
            return self._where[rid]
        except KeyError:
            raise KeyError(f"TokenCache: record id {rid!r} is not in {self.out_dir}") from None

    def _shard(self, name: str) -> Tensor:
        if name in self._shards:
            self._shards.move_to_end(name)
            return self._shards[name]
        data = (self.out_dir / name).read_bytes()
        rec = self._records.get(name)
        if rec is not None and name not in self._verified:
            if len(data) != rec["bytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
                raise self._damaged(name, f"differs from what was written (sha256 in {SHARDS_FILE})")
        try:
            ids, _ = parse_shard(data)  # (n, N)
        except ValueError as exc:
            raise self._damaged(name, f"is unusable: {exc}") from None
        if ids.dim() != 2 or ids.shape[1] != self.tokens_per_image or ids.shape[0] < self._rows.get(name, 0):
            raise self._damaged(name, f"has ids of shape {tuple(ids.shape)}; {META_FILE} says "
                                      f"{self.tokens_per_image} tokens per image and {INDEX_FILE} refers to "
                                      f"{self._rows.get(name, 0)} rows")
        self._verified.add(name)
        self._shards[name] = ids
        if len(self._shards) > self._max_shards:
            self._shards.popitem(last=False)
        return ids
