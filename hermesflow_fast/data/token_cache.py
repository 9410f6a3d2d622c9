"""Pre-tokenized images: encode every image of a dataset once, store its codes, read them back by record id.

HermesFlow re-encodes the win and lose images with MAGVIT-v2 at every step (perf-anchors §5: ≈1.4 TFLOP per 512²
image, ~11% of a DPO step). The codes of an image never change for a frozen tokenizer, so they are computed once:

    source  a folder of images (record id = path relative to the folder, without extension, '/'-separated), or a
            JSONL file of {"id": str|int, "image": path relative to the JSONL file's folder} lines
    out_dir/cache.json               format, tokenizer type, num_codes, grid, image size, dtype, tokenizer digest
    out_dir/shard-00000.safetensors  "ids": (n, N) uint16 if num_codes ≤ 65536 else int32, N = grid h·w codes per
                                     image, row-major as tokenizer.encode; the rows' record ids in the metadata
    out_dir/index.jsonl              {"id", "shard", "row"} per record, in the order written
    out_dir/shards.jsonl             {"shard", "rows", "bytes", "sha256"} per shard file, as written
    out_dir/errors.jsonl             {"id", "path", "reason"} per image of the latest run that could not be used

For each record: row = tokenizer.encode(load_image(path)[None])[0], so ``TokenCache(out_dir)[id]`` equals the
tokenizer's codes of that image (batches change nothing: both tokenizers encode each image independently).

Crash safety and resume. A shard is written to a temp file (``*.tmp``), fsynced and renamed; only then are its
size and sha256 appended to shards.jsonl and its index lines to index.jsonl (one fsynced write each). A rerun reads the
index, drops a torn last line (a kill mid-append), deletes temp files and shards no index line refers to (a kill between
rename and append), skips the ids already indexed and appends new shards numbered after the existing ones. Before that
it checks every indexed shard: size and sha256 against shards.jsonl, or, for a shard without a line there (a cache
written before shards.jsonl existed), by re-reading it (a readable safetensors file whose ``ids`` have the cache's dtype
and width, rows for every index line, and the record ids the index gives); the line is then added. A missing or damaged
shard (truncated, overwritten) is dropped from the index, its file kept aside as ``shard-XXXXX.safetensors.damaged``,
and its records are encoded again; the summary says which shard and why. A killed run therefore loses at most the rows
not yet in an indexed shard and never indexes an id twice. Images that cannot be read (missing, corrupt, truncated, a
size other than tokenizer.image_size, a mode other than RGB unless the tokenizer's convert_to_rgb allows it) are listed
in errors.jsonl with the reason, counted in the summary and skipped: nothing is substituted for them, and a rerun tries
them again. A rerun with a different tokenizer (digest of its config and weights) is refused. One writer per out_dir at
a time.

Reading (``TokenCache``, data/token_cache_reader.py) checks every shard and row it serves.

    python -m pytest -q tests/data/test_token_cache.py
    hermesflow tokenize SOURCE --tokenizer PATH --out DIR        (the CLI calls tokenize_command)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hermesflow_fast.data.token_cache_reader import (  # TokenCache, TokenCacheError, codes_problem: re-exported
    INDEX_FILE,
    META_FILE,
    SHARDS_FILE,
    TokenCache,
    TokenCacheError,
    codes_problem,
    parse_shard,
    read_index,
    read_meta,
    read_shard_records,
)
from hermesflow_fast.errors import UserError
from hermesflow_fast.io import append_synced, read_jsonl, write_atomic
from hermesflow_fast.model.tokenizer_vq import ImageTokenizer, load_image, load_image_tokenizer

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "TokenCache",
    "TokenCacheError",
    "TokenizeSummary",
    "codes_problem",
    "list_records",
    "tokenize_command",
    "tokenize_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMAT = "hermesflow-token-cache/1"
ERRORS_FILE = "errors.jsonl"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    id: str
    path: Path


def list_records(source: str | os.PathLike) -> list[ImageRecord]:
    """The records of a folder of images (sorted by id) or of a JSONL file (file order). Raises TokenCacheError on a
    duplicate id, a malformed JSONL line (file:line named) or a source that is neither."""
    source = Path(source)
    if source.is_dir():
        records, seen = [], {}
        for p in sorted(source.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
                continue
            rid = p.relative_to(source).with_suffix("").as_posix()
            if rid in seen:
                raise TokenCacheError(f"{source}: {seen[rid]} and {p} have the same record id {rid!r} (path without "
                                 f"extension); rename one")
            seen[rid] = p
            records.append(ImageRecord(rid, p))
        return sorted(records, key=lambda r: r.id)
    if source.is_file():
        return _jsonl_records(source)
    raise TokenCacheError(f"tokenize: source {source} does not exist (expected a folder of images or a JSONL file)")


def _jsonl_records(file: Path) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    seen: dict[str, int] = {}
    hint = "; expected a JSONL file of {\"id\", \"image\"} lines"
    for lineno, obj in read_jsonl(file, error=TokenCacheError, hint=hint):
        where = f"{file}:{lineno}"
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("image"), str):
            raise TokenCacheError(f"{where}: each line needs \"id\" (str or int) and \"image\" (a path), got "
                                  f"{json.dumps(obj, ensure_ascii=False)[:120]}")
        rid = obj["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise TokenCacheError(f"{where}: \"id\" must be a non-empty string or an int, got {rid!r}")
        rid = str(rid)
        if rid in seen:
            raise TokenCacheError(f"{where}: id {rid!r} already appears on line {seen[rid]}")
        seen[rid] = lineno
        path = Path(obj["image"])
        records.append(ImageRecord(rid, path if path.is_absolute() else file.parent / path))
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizeSummary:
    out_dir: Path
    records: int  # in the source
    cached_before: int  # of them, already in the cache when the run started
    written: int  # rows written by this run
    errors: int  # images skipped (listed in errors.jsonl)
    shards: list[str] = field(default_factory=list)  # shard files written by this run
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> why it was dropped from the cache
    reencoded: int = 0  # rows of damaged shards written again by this run
    dropped: int = 0  # records of damaged shards that are not in the source (no longer in the cache)

    def __str__(self) -> str:
        s = (f"tokenize: {self.records} records, {self.cached_before} already cached, {self.written} written in "
             f"{len(self.shards)} shard(s), {self.errors} error(s)")
        s += (f" (see {self.out_dir / ERRORS_FILE})" if self.errors else "") + f" -> {self.out_dir}"
        if self.damaged:
            why = "; ".join(f"{k}: {v}" for k, v in list(self.damaged.items())[:3])
            more = f"; … {len(self.damaged) - 3} more" if len(self.damaged) > 3 else ""
            s += (f"; {len(self.damaged)} damaged shard(s) dropped ({why}{more}; kept as *.damaged), "
                  f"{self.reencoded} of their record(s) re-encoded")
            if self.dropped:
                s += f", {self.dropped} not in the source and no longer cached"
        return s


def tokenize_images(source: str | os.PathLike, tokenizer: ImageTokenizer, out_dir: str | os.PathLike,
                    batch_size: int = 64, shard_size: int = 4096, progress: bool = True,
                    workers: int | None = None) -> TokenizeSummary:
    """Encode every image of ``source`` not yet in ``out_dir`` with ``tokenizer`` and append it to the cache.

    ``workers`` threads decode images ahead of the encoder (default min(4, CPUs); 0 decodes inline). Shards found
    missing or damaged are dropped and their records encoded again (module docstring). Returns the summary (also
    printed when ``progress``). Raises TokenCacheError for a bad source or a cache written by another tokenizer.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise UserError(f"tokenize: batch_size={batch_size} and shard_size={shard_size} must be ≥ 1")
    out = Path(out_dir)
    records = list_records(source)
    out.mkdir(parents=True, exist_ok=True)
    meta = _check_or_write_meta(out, tokenizer)
    tokens, dtype = int(meta["tokens_per_image"]), getattr(torch, meta["dtype"])
    entries = read_index(out, repair=True)
    entries, damaged, lost = _check_shards(out, entries, meta)
    next_shard = _prepare_shards(out, entries)
    done = {e["id"] for e in entries}
    todo = [r for r in records if r.id not in done]
    summary = TokenizeSummary(out, len(records), len(records) - len(todo), 0, 0, damaged=damaged)
    if damaged:
        summary.dropped = len(lost - {r.id for r in records})
        if progress:
            print(f"tokenize: {len(damaged)} damaged shard(s) in {out}: "
                  + "; ".join(f"{k}: {v}" for k, v in damaged.items())
                  + f"; re-encoding their {len(lost) - summary.dropped} record(s)", file=sys.stderr)

    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    size, convert = tuple(tokenizer.image_size), bool(tokenizer.convert_to_rgb)

    def load(rec: ImageRecord) -> tuple[ImageRecord, Tensor | None, str | None]:
        try:
            return rec, load_image(rec.path, size, convert), None
        except ValueError as exc:
            return rec, None, str(exc)

    def submit(batch: list[ImageRecord]) -> list[Any]:
        return [pool.submit(load, r) for r in batch] if pool else batch

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    buf_ids: list[str] = []
    buf_rows: list[Tensor] = []
    bar = tqdm(total=len(todo), desc="tokenize", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with open(out / ERRORS_FILE, "w", encoding="utf-8") as errors:
            pending = submit(batches[0]) if batches else []
            for bi in range(len(batches)):
                loaded = [f.result() for f in pending] if pool else [load(r) for r in pending]
                pending = submit(batches[bi + 1]) if bi + 1 < len(batches) else []
                good = [(rec, x) for rec, x, _ in loaded if x is not None]
                for rec, _, reason in loaded:
                    if reason is not None:
                        errors.write(json.dumps({"id": rec.id, "path": str(rec.path), "reason": reason}) + "\n")
                        summary.errors += 1
                errors.flush()
                if good:
                    codes = _encode(tokenizer, torch.stack([x for _, x in good]), tokens, int(meta["num_codes"]))
                    buf_ids.extend(rec.id for rec, _ in good)
                    buf_rows.extend(codes.to(dtype).unbind(0))
                while len(buf_ids) >= shard_size:
                    _write_shard(out, next_shard, buf_ids[:shard_size], buf_rows[:shard_size], summary)
                    summary.reencoded += len(lost.intersection(buf_ids[:shard_size]))
                    next_shard += 1
                    del buf_ids[:shard_size], buf_rows[:shard_size]
                bar.update(len(loaded))
                bar.set_postfix(errors=summary.errors, refresh=False)
            if buf_ids:
                _write_shard(out, next_shard, buf_ids, buf_rows, summary)
                summary.reencoded += len(lost.intersection(buf_ids))
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    if progress:
        print(summary, file=sys.stderr)
    return summary


def _encode(tokenizer: ImageTokenizer, images: Tensor, tokens: int, num_codes: int) -> Tensor:
    """images (B, 3, H, W) -> codes (B, N) int64 on the CPU, checked against the cache's N and code range."""
    codes = tokenizer.encode(images.to(tokenizer.device)).cpu()
    if codes.dim() != 2 or tuple(codes.shape) != (images.shape[0], tokens):
        raise ValueError(f"tokenize: tokenizer.encode returned shape {tuple(codes.shape)} for images "
                         f"{tuple(images.shape)}, the cache expects ({images.shape[0]}, {tokens})")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"tokenize: tokenizer.encode returned codes outside [0, {num_codes}): min "
                         f"{int(codes.min())}, max {int(codes.max())}")
    return codes


def _write_shard(out: Path, number: int, ids: list[str], rows: list[Tensor], summary: TokenizeSummary) -> None:
    """Temp file, fsync, rename; then its size + sha256 line and the index lines, each one fsynced append."""
    from safetensors.torch import save

    name = _shard_name(number)
    data = save({"ids": torch.stack(rows).contiguous()}, metadata={"format": FORMAT, "record_ids": json.dumps(ids)})
    write_atomic(out / name, data, fsync=True)
    append_synced(out / SHARDS_FILE, json.dumps(_shard_record(name, len(ids), data)) + "\n")
    append_synced(out / INDEX_FILE, "".join(json.dumps({"id": rid, "shard": name, "row": r}) + "\n"
                                            for r, rid in enumerate(ids)))
    summary.written += len(ids)
    summary.shards.append(name)


def _shard_record(name: str, rows: int, data: bytes) -> dict[str, Any]:
    return {"shard": name, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _prepare_shards(out: Path, entries: list[dict[str, Any]]) -> int:
    """Delete temp files and unindexed shards (left by a killed run or dropped as damaged); next shard number."""
    referenced = {e["shard"] for e in entries}
    for p in out.glob("*.tmp"):
        p.unlink()
    for p in out.glob("shard-*.safetensors"):
        if p.name not in referenced:
            p.unlink()
    numbers = [int(m[1]) for s in referenced if (m := _SHARD_RE.match(s))]
    return max(numbers, default=-1) + 1


def _check_shards(out: Path, entries: list[dict[str, Any]], meta: dict[str, Any]
                  ) -> tuple[list[dict[str, Any]], dict[str, str], set[str]]:
    """Verify every indexed shard (module docstring) → (the entries of sound shards, {shard: reason} of the damaged
    ones, the ids these held). Drops the damaged shards' lines from the index and brings shards.jsonl to one line
    per sound shard (adding the lines of shards verified by re-reading)."""
    recorded = read_shard_records(out, repair=True)
    rows: dict[str, dict[int, str]] = {}
    for e in entries:
        rows.setdefault(e["shard"], {})[e["row"]] = e["id"]
    damaged: dict[str, str] = {}
    sound: dict[str, dict[str, Any]] = {}
    for name, shard_rows in rows.items():
        reason, record = _shard_damage(out / name, recorded.get(name), shard_rows, meta)
        if reason is None:
            sound[name] = record
        else:
            damaged[name] = reason
    lost = {e["id"] for e in entries if e["shard"] in damaged}
    if damaged:
        entries = [e for e in entries if e["shard"] not in damaged]
        write_atomic(out / INDEX_FILE, "".join(json.dumps(e) + "\n" for e in entries), fsync=True)
        for name in damaged:  # kept aside, never read again; a later damage of the same name replaces it
            if (out / name).is_file():
                os.replace(out / name, out / (name + ".damaged"))
    if sound != recorded:
        write_atomic(out / SHARDS_FILE, "".join(json.dumps(r) + "\n" for r in sound.values()), fsync=True)
    return entries, damaged, lost


def _shard_damage(file: Path, record: dict[str, Any] | None, rows: dict[int, str], meta: dict[str, Any]
                  ) -> tuple[str | None, dict[str, Any] | None]:
    """(why ``file`` cannot serve ``rows`` {row: id}, None) or (None, its shards.jsonl record)."""
    if not file.is_file():
        return "missing", None
    if record is not None:
        size = file.stat().st_size
        if size != record["bytes"]:
            return f"{size:,} bytes, {record['bytes']:,} when written", None
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            return "its sha256 differs from the one recorded when it was written", None
        if record["rows"] <= max(rows):
            return f"{record['rows']} rows, but {INDEX_FILE} refers to row {max(rows)}", None
        return None, record
    data = file.read_bytes()  # a shard written before shards.jsonl: re-read it
    try:
        ids, header = parse_shard(data)
    except ValueError as exc:
        return str(exc), None
    if ids.dim() != 2 or ids.shape[1] != int(meta["tokens_per_image"]) or str(ids.dtype) != f"torch.{meta['dtype']}":
        return (f"ids are {ids.dtype} {tuple(ids.shape)}, {META_FILE} says {meta['dtype']} "
                f"(n, {meta['tokens_per_image']})"), None
    if ids.shape[0] <= max(rows):
        return f"{ids.shape[0]} rows, but {INDEX_FILE} refers to row {max(rows)}", None
    written = (header.get("__metadata__") or {}).get("record_ids")
    if written is not None:
        try:
            written = json.loads(written)
        except json.JSONDecodeError:
            return "its record_ids metadata is not JSON", None
        wrong = [r for r, rid in rows.items() if r >= len(written) or written[r] != rid]
        if wrong:
            return (f"row {wrong[0]} holds record {written[wrong[0]] if wrong[0] < len(written) else None!r}, "
                    f"{INDEX_FILE} says {rows[wrong[0]]!r}"), None
    return None, _shard_record(file.name, int(ids.shape[0]), data)


def _tokenizer_meta(tokenizer: ImageTokenizer) -> dict[str, Any]:
    h, w = tokenizer.grid
    num_codes = int(tokenizer.num_codes)
    digest = hashlib.sha256()
    config = getattr(tokenizer, "config", None)
    if dataclasses.is_dataclass(config):
        digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    state = tokenizer.state_dict() if hasattr(tokenizer, "state_dict") else {}
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "format": FORMAT, "tokenizer_class": type(tokenizer).__name__, "num_codes": num_codes,
        "grid": [int(h), int(w)], "tokens_per_image": int(h) * int(w), "image_size": list(tokenizer.image_size),
        "dtype": "uint16" if num_codes <= 65536 else "int32", "tokenizer_digest": digest.hexdigest(),
    }


def _check_or_write_meta(out: Path, tokenizer: ImageTokenizer) -> dict[str, Any]:
    meta = _tokenizer_meta(tokenizer)
    file = out / META_FILE
    if file.is_file():
        old = read_meta(file)
        diff = [f"{k}: cache {old.get(k)!r} vs tokenizer {v!r}" for k, v in meta.items() if old.get(k) != v]
        if diff:
            raise TokenCacheError(f"{file}: this cache was written with another tokenizer ({'; '.join(diff)}); "
                                  f"tokenize into a fresh folder")
        return old
    write_atomic(file, json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# CLI entry
# ---------------------------------------------------------------------------------------------------------------------


def tokenize_command(source: str | os.PathLike, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                     batch_size: int = 64, shard_size: int = 4096, device: str = "auto") -> TokenizeSummary:
    """``hermesflow tokenize``: load the tokenizer at ``tokenizer_path`` (local; MAGVIT-v2 or patch VQ) onto
    ``device`` ("auto" = cuda if available, else cpu) and run tokenize_images with a progress bar. Arguments are
    checked before anything is read or written (UserError naming the option)."""
    for option, value in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value < 1:
            raise UserError(f"tokenize: {option} must be ≥ 1, got {value}")
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise UserError(f"tokenize: --device must be auto, cpu or cuda[:N], got {device!r}")
    if not Path(source).exists():
        raise TokenCacheError(f"tokenize: source {source} does not exist (expected a folder of images or a JSONL "
                              f"file)")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"tokenize: --out {out_dir} is a file, expected a token cache folder")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"tokenize: --device {device} but CUDA is not available here")
    tokenizer = load_image_tokenizer(tokenizer_path, device=device)
    return tokenize_images(source, tokenizer, out_dir, batch_size=batch_size, shard_size=shard_size, progress=True)
