"""Pre-tokenized images: encode every image of a dataset once, store its codes, read them back by record id.

HermesFlow re-encodes the win and lose images with MAGVIT-v2 at every step (perf-anchors §5: ≈1.4 TFLOP per 512²
image, ~11% of a DPO step). The codes of an image never change for a frozen tokenizer, so they are computed once:

    source  a folder of images (record id = path relative to the folder, without extension, '/'-separated), or a
            JSONL file of {"id": str|int, "image": path relative to the JSONL file's folder} lines
    out_dir/cache.json               format, tokenizer type, num_codes, grid, image size, dtype, tokenizer digest
    out_dir/shard-00000.safetensors  "ids": (n, N) uint16 if num_codes ≤ 65536 else int32, N = grid h·w codes per
                                     image, row-major as tokenizer.encode; the rows' record ids in the metadata
    out_dir/index.jsonl              {"id", "shard", "row"} per record, in the order written
    out_dir/errors.jsonl             {"id", "path", "reason"} per image of the latest run that could not be used

For each record: row = tokenizer.encode(load_image(path)[None])[0], so ``TokenCache(out_dir)[id]`` equals the
tokenizer's codes of that image (batches change nothing: both tokenizers encode each image independently).

Crash safety and resume. A shard is written to ``shard-XXXXX.safetensors.tmp``, fsynced and renamed; only then are
its index lines appended (one write, fsynced). A rerun reads the index, drops a torn last line (a kill mid-append),
deletes temp files and shards no index line refers to (a kill between rename and append), skips the ids already
indexed and appends new shards numbered after the existing ones. A killed run therefore loses at most the rows not
yet in an indexed shard and never indexes an id twice. Images that cannot be read (missing, corrupt, truncated, a
size other than tokenizer.image_size, a mode other than RGB unless the tokenizer's convert_to_rgb allows it) are
listed in errors.jsonl with the reason, counted in the summary and skipped: nothing is substituted for them, and a
rerun tries them again. A rerun with a different tokenizer (digest of its config and weights) is refused. One writer
per out_dir at a time.

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
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hermesflow_fast.model.tokenizer_vq import ImageTokenizer, load_image, load_image_tokenizer

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "TokenCache",
    "TokenizeSummary",
    "list_records",
    "tokenize_command",
    "tokenize_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMAT = "hermesflow-token-cache/1"
META_FILE, INDEX_FILE, ERRORS_FILE = "cache.json", "index.jsonl", "errors.jsonl"
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
    """The records of a folder of images (sorted by id) or of a JSONL file (file order). Raises ValueError on a
    duplicate id, a malformed JSONL line (file:line named) or a source that is neither."""
    source = Path(source)
    if source.is_dir():
        records, seen = [], {}
        for p in sorted(source.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
                continue
            rid = p.relative_to(source).with_suffix("").as_posix()
            if rid in seen:
                raise ValueError(f"{source}: {seen[rid]} and {p} have the same record id {rid!r} (path without "
                                 f"extension); rename one")
            seen[rid] = p
            records.append(ImageRecord(rid, p))
        return sorted(records, key=lambda r: r.id)
    if source.is_file():
        return _jsonl_records(source)
    raise FileNotFoundError(f"tokenize: source {source} is neither a folder of images nor a JSONL file")


def _jsonl_records(file: Path) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    seen: dict[str, int] = {}
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not a JSON object ({exc})") from exc
            if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("image"), str):
                raise ValueError(f"{where}: each line needs \"id\" (str or int) and \"image\" (a path), got "
                                 f"{line.strip()[:120]}")
            rid = obj["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
                raise ValueError(f"{where}: \"id\" must be a non-empty string or an int, got {rid!r}")
            rid = str(rid)
            if rid in seen:
                raise ValueError(f"{where}: id {rid!r} already appears on line {seen[rid]}")
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

    def __str__(self) -> str:
        s = (f"tokenize: {self.records} records, {self.cached_before} already cached, {self.written} written in "
             f"{len(self.shards)} shard(s), {self.errors} error(s)")
        return s + (f" (see {self.out_dir / ERRORS_FILE})" if self.errors else "") + f" -> {self.out_dir}"


def tokenize_images(source: str | os.PathLike, tokenizer: ImageTokenizer, out_dir: str | os.PathLike,
                    batch_size: int = 64, shard_size: int = 4096, progress: bool = True,
                    workers: int | None = None) -> TokenizeSummary:
    """Encode every image of ``source`` not yet in ``out_dir`` with ``tokenizer`` and append it to the cache.

    ``workers`` threads decode images ahead of the encoder (default min(4, CPUs); 0 decodes inline). Returns the
    summary (also printed when ``progress``). Raises ValueError for a bad source, a cache written by another
    tokenizer, or an index naming a shard that is gone.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"tokenize_images: batch_size={batch_size} and shard_size={shard_size} must be ≥ 1")
    out = Path(out_dir)
    records = list_records(source)
    out.mkdir(parents=True, exist_ok=True)
    meta = _check_or_write_meta(out, tokenizer)
    tokens, dtype = int(meta["tokens_per_image"]), getattr(torch, meta["dtype"])
    entries = _read_index(out, repair=True)
    next_shard = _prepare_shards(out, entries)
    done = {e["id"] for e in entries}
    todo = [r for r in records if r.id not in done]
    summary = TokenizeSummary(out, len(records), len(records) - len(todo), 0, 0)

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
                    next_shard += 1
                    del buf_ids[:shard_size], buf_rows[:shard_size]
                bar.update(len(loaded))
                bar.set_postfix(errors=summary.errors, refresh=False)
            if buf_ids:
                _write_shard(out, next_shard, buf_ids, buf_rows, summary)
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
    """Temp file, fsync, rename; then the index lines in one fsynced append."""
    from safetensors.torch import save_file

    name = _shard_name(number)
    final, tmp = out / name, out / (name + ".tmp")
    save_file({"ids": torch.stack(rows).contiguous()}, str(tmp),
              metadata={"format": FORMAT, "record_ids": json.dumps(ids)})
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(out)
    lines = "".join(json.dumps({"id": rid, "shard": name, "row": r}) + "\n" for r, rid in enumerate(ids))
    with open(out / INDEX_FILE, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
    summary.written += len(ids)
    summary.shards.append(name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _prepare_shards(out: Path, entries: list[dict[str, Any]]) -> int:
    """Delete temp files and unindexed shards (left by a killed run); check indexed shards exist; next shard number."""
    referenced = {e["shard"] for e in entries}
    gone = sorted(s for s in referenced if not (out / s).is_file())
    if gone:
        raise ValueError(f"{out / INDEX_FILE} refers to shards that do not exist: {gone[:5]}; the cache is "
                         f"damaged, tokenize into a fresh folder")
    for p in out.glob("shard-*.safetensors.tmp"):
        p.unlink()
    for p in out.glob("shard-*.safetensors"):
        if p.name not in referenced:
            p.unlink()
    numbers = [int(m[1]) for s in referenced if (m := _SHARD_RE.match(s))]
    return max(numbers, default=-1) + 1


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
        old = json.loads(file.read_text())
        diff = [f"{k}: cache {old.get(k)!r} vs tokenizer {v!r}" for k, v in meta.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{file}: this cache was written with another tokenizer ({'; '.join(diff)}); "
                             f"tokenize into a fresh folder")
        return old
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, file)
    return meta


def _read_index(out: Path, repair: bool) -> list[dict[str, Any]]:
    """The index entries; a torn last line (no newline: a kill mid-append) is ignored, and cut off if ``repair``."""
    file = out / INDEX_FILE
    if not file.is_file():
        return []
    data = file.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(file, "r+b") as f:
            f.truncate(end)
    entries, seen = [], {}
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            rid, shard, row = e["id"], e["shard"], int(e["row"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{file}:{lineno}: not an index line {{id, shard, row}} ({exc})") from exc
        if rid in seen:
            raise ValueError(f"{file}:{lineno}: id {rid!r} is already indexed on line {seen[rid]}")
        seen[rid] = lineno
        entries.append({"id": rid, "shard": shard, "row": row})
    return entries


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


class TokenCache:
    """Read-only view of a token cache: ``cache[id]`` -> (N,) int64 codes; the last ``max_shards`` shards read stay
    in memory."""

    def __init__(self, out_dir: str | os.PathLike, max_shards: int = 8) -> None:
        self.out_dir = Path(out_dir)
        meta_file = self.out_dir / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"TokenCache: {meta_file} not found; is {self.out_dir} a token cache?")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        self.num_codes = int(self.meta["num_codes"])
        self.tokens_per_image = int(self.meta["tokens_per_image"])
        self.grid = tuple(self.meta["grid"])
        self._where = {e["id"]: (e["shard"], e["row"]) for e in _read_index(self.out_dir, repair=False)}
        self._shards: OrderedDict[str, Tensor] = OrderedDict()
        self._max_shards = max(1, max_shards)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, rid: object) -> bool:
        return rid in self._where

    def ids(self) -> list[str]:
        """Record ids in the order they were written."""
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __getitem__(self, rid: str) -> Tensor:
        try:
            shard, row = self._where[rid]
        except KeyError:
            raise KeyError(f"TokenCache: record id {rid!r} is not in {self.out_dir}") from None
        return self._shard(shard)[row].to(torch.int64)  # (N,)

    def _shard(self, name: str) -> Tensor:
        if name in self._shards:
            self._shards.move_to_end(name)
            return self._shards[name]
        from safetensors.torch import load_file

        ids = load_file(str(self.out_dir / name))["ids"]  # (n, N)
        if ids.dim() != 2 or ids.shape[1] != self.tokens_per_image:
            raise ValueError(f"{self.out_dir / name}: ids has shape {tuple(ids.shape)}, {META_FILE} says "
                             f"{self.tokens_per_image} tokens per image")
        self._shards[name] = ids
        if len(self._shards) > self._max_shards:
            self._shards.popitem(last=False)
        return ids


# ---------------------------------------------------------------------------------------------------------------------
# CLI entry
# ---------------------------------------------------------------------------------------------------------------------


def tokenize_command(source: str | os.PathLike, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                     batch_size: int = 64, shard_size: int = 4096, device: str = "auto") -> TokenizeSummary:
    """``hermesflow tokenize``: load the tokenizer at ``tokenizer_path`` (local; MAGVIT-v2 or patch VQ) onto
    ``device`` ("auto" = cuda if available, else cpu) and run tokenize_images with a progress bar."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_image_tokenizer(tokenizer_path, device=device)
    return tokenize_images(source, tokenizer, out_dir, batch_size=batch_size, shard_size=shard_size, progress=True)
