"""Validation of preference pairs before training: every problem named with file, line and id; nothing silently
reused or replaced.

Checks, in order, per record (a side = understanding "und" (image, y_w, y_l) or generation "gen" (prompt, x_w, x_l)):

    missing field     no id or prompt (record dropped); a side with only one of its two fields, or an und side
                      without the real image (that side dropped)
    duplicate id      the id appeared on an earlier line (this record dropped; the first one is kept)
    missing image     a path that does not exist; a ``cache:<id>`` ref not in the token cache (or no cache given)
    unreadable image  a path PIL cannot open and verify (header + structure; no full decode)
    bad codes         a ``cache:<id>`` row holding NaN/inf, a non-integer or a code outside the tokenizer's codebook
                      [0, num_codes) (the message names the shard file and row; one scan per shard)
    equal pair        y_w == y_l (after strip) drops the und side; x_w == x_l (same file, files with the same bytes,
                      same cache row, or equal cached codes) drops the gen side; a file is hashed only when another
                      file of its pair has its size, once
    too long          a caption over ``caption_budget`` tokens or a prompt over ``prompt_budget`` tokens: with
                      ``truncate`` it is counted (batching cuts it), without, its side is dropped
    no side           neither side declared (record dropped)

A record that loses both sides is dropped (counted under the first problem that cost it a side). ``strict=True``
raises one UserError listing the first 20 problems and their total (callers write nothing); ``strict=False``
returns the kept records, with a dropped side's fields set to None, and the report.

    report = validate_pairs(read_pairs(f), f, root=f.parent, text_tokenizer=tok, caption_budget=100, truncate=False,
                            strict=False, token_cache=TokenCache(cache_dir))
    print(report.summary())   # kept 4,812 / 5,000 (und 4,790, gen 4,801); dropped: 120 equal pair, 68 missing image

    python -m pytest -q tests/data/test_validate.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hermesflow_fast.data.image_ref import cache_id, image_problem, resolve_path
from hermesflow_fast.data.pairs import PairRecord
from hermesflow_fast.data.text import caption_ids, prompt_ids
from hermesflow_fast.data.token_cache import codes_problem
from hermesflow_fast.errors import UserError

__all__ = ["KINDS", "Problem", "ValidationReport", "validate_pairs"]

KINDS = ("missing field", "duplicate id", "missing image", "unreadable image", "bad codes", "equal pair", "too long",
         "no side")
_SIDE_FIELDS = {"und": ("caption_chosen", "caption_rejected"), "gen": ("image_chosen", "image_rejected")}
MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    id: str
    kind: str  # one of KINDS
    side: str | None  # "und", "gen", or None for the whole record
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        side = f" [{self.side}]" if self.side else ""
        return f"{where}: id {self.id!r}{side}: {self.kind}: {self.message}"


@dataclass
class ValidationReport:
    source: str
    total: int  # records given
    kept: list[PairRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # truncations excluded (counted in ``truncated``)
    dropped: Counter = field(default_factory=Counter)  # records dropped, by kind
    sides_dropped: Counter = field(default_factory=Counter)  # (side, kind) -> sides dropped from KEPT records
    truncated: int = 0  # texts over budget that batching will cut (truncate=True)

    @property
    def num_und(self) -> int:
        return sum(r.has_und for r in self.kept)

    @property
    def num_gen(self) -> int:
        return sum(r.has_gen for r in self.kept)

    def summary(self) -> str:
        """``kept 4,812 / 5,000 (und 4,790, gen 4,801); dropped: 120 equal pair, 68 missing image; …``"""
        s = f"kept {len(self.kept):,} / {self.total:,} (und {self.num_und:,}, gen {self.num_gen:,})"
        if self.dropped:
            s += "; dropped: " + ", ".join(f"{n:,} {k}" for k, n in _by_kind(self.dropped))
        if self.sides_dropped:
            items = sorted(self.sides_dropped.items(), key=lambda kv: (KINDS.index(kv[0][1]), kv[0][0]))
            s += "; sides dropped: " + ", ".join(f"{n:,} {k} ({side})" for (side, k), n in items)
        if self.truncated:
            s += f"; truncated: {self.truncated:,} text(s) over budget"
        return s

    def __str__(self) -> str:
        return self.summary()


def _by_kind(c: Counter) -> list[tuple[str, int]]:
    return sorted(c.items(), key=lambda kv: KINDS.index(kv[0]))


def _blank(v: str | None) -> bool:
    return v is None or not v.strip()


def validate_pairs(
    records: Sequence[PairRecord], source: str | os.PathLike, *, root: str | os.PathLike, text_tokenizer: Any,
    caption_budget: int, truncate: bool, strict: bool, token_cache: Any = None,
    image_exists: Callable[[Path], bool | str | None] = image_problem, prompt_budget: int | None = None,
    num_codes: int | None = None,
) -> ValidationReport:
    """Check ``records`` read from ``source`` (named in every problem); see the module docstring.

    ``root``: the folder path refs are relative to (the JSONL file's). ``caption_budget``: most caption tokens
    (``caption_ids``, eos excluded); ``prompt_budget`` (default ``caption_budget``): most prompt tokens
    (``prompt_ids``).
    ``token_cache``: a TokenCache (or mapping id -> codes) serving ``cache:`` refs. ``num_codes``: the codebook size
    cached codes must fall below (default the cache's ``num_codes``; the model's image-code count when smaller).
    ``image_exists(path)``: None or True if the file is usable, False if missing, or a reason string ("missing: …" /
    "unreadable: …").
    """
    if caption_budget < 1:
        raise ValueError(f"validate_pairs: caption_budget must be ≥ 1, got {caption_budget}")
    prompt_budget = caption_budget if prompt_budget is None else prompt_budget
    source = str(source)
    report = ValidationReport(source, len(records))
    seen: dict[str, int | None] = {}
    image_memo: dict[str, tuple[str, str] | None] = {}
    codes_memo: dict[str, str | None] = {}
    digests: dict[str, tuple[int, str | None] | None] = {}  # path -> (size, sha256 once computed); None: no file
    if num_codes is None:
        num_codes = getattr(token_cache, "num_codes", None)

    def check_image(ref: str) -> tuple[str, str] | None:
        """(kind, message) of a bad image ref, None when fine; each cache row or file is checked once."""
        rid = cache_id(ref)
        if rid is not None:
            if token_cache is None:
                return "missing image", f"{ref!r} names a token cache, but none was given"
            if rid not in token_cache:
                return "missing image", f"{ref!r}: record {rid!r} is not in the token cache"
            if rid not in codes_memo:
                if hasattr(token_cache, "row_problem"):
                    codes_memo[rid] = token_cache.row_problem(rid, num_codes)
                else:
                    codes_memo[rid] = codes_problem(torch.as_tensor(token_cache[rid]),
                                                    num_codes if num_codes is not None else 2**63 - 1)
            bad_codes = codes_memo[rid]
            return None if bad_codes is None else ("bad codes", f"{ref!r}: {bad_codes}")
        path = Path(os.path.normpath(resolve_path(ref, root)))
        key = str(path)
        if key not in image_memo:
            verdict = image_exists(path)
            if verdict is None or verdict is True:
                image_memo[key] = None
            elif verdict is False or str(verdict).startswith("missing"):
                image_memo[key] = ("missing image", f"{path} does not exist" if verdict is False
                                   else str(verdict).removeprefix("missing: "))
            else:
                image_memo[key] = ("unreadable image", str(verdict).removeprefix("unreadable: "))
        bad = image_memo[key]
        return None if bad is None else (bad[0], f"{ref!r}: {bad[1]}")

    def size_of(path: str) -> int | None:
        if path not in digests:
            try:
                digests[path] = (os.stat(path).st_size, None)
            except OSError:
                digests[path] = None
        entry = digests[path]
        return None if entry is None else entry[0]

    def sha256_of(path: str) -> str:
        size, digest = digests[path]
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
            digests[path] = (size, digest)
        return digest

    def same_image(a: str, b: str) -> str | None:
        """How ``a`` and ``b`` are the same image ("the same file", …), None when they are not."""
        ca, cb = cache_id(a), cache_id(b)
        if ca is not None and cb is not None:
            if ca == cb:
                return "the same cache row"
            if token_cache is not None and torch.equal(token_cache[ca], token_cache[cb]):
                return "equal cached codes"
            return None
        if ca is None and cb is None:
            pa, pb = (os.path.normpath(resolve_path(x, root)) for x in (a, b))
            if pa == pb:
                return "the same file"
            size = size_of(pa)
            if size is not None and size == size_of(pb) and sha256_of(pa) == sha256_of(pb):
                return "files with identical bytes"
        return None

    for i, rec in enumerate(records):
        rid = rec.id if not _blank(rec.id) else f"#{i}"
        found: list[Problem] = []

        def problem(kind: str, side: str | None, message: str, _rec=rec, _rid=rid, _found=found) -> None:
            _found.append(Problem(source, _rec.line, _rid, kind, side, message))

        # record-level
        if _blank(rec.id) or _blank(rec.prompt):
            missing = [k for k in ("id", "prompt") if _blank(getattr(rec, k))]
            problem("missing field", None, f"no {' and no '.join(missing)}")
        elif rec.id in seen:
            first = seen[rec.id]
            problem("duplicate id", None, f"id already used{f' on line {first}' if first is not None else ''}")
        else:
            seen[rec.id] = rec.line
        if not rec.has_und and not rec.has_gen:
            problem("no side", None, "neither captions (und) nor images (gen) given")
        if found:
            report.problems += found
            report.dropped[found[0].kind] += 1
            continue

        # per side; the first problem of a side drops it
        lost: dict[str, Problem] = {}
        for side in ("und", "gen"):
            if not (rec.has_und if side == "und" else rec.has_gen):
                continue
            n_before = len(found)
            a, b = (getattr(rec, k) for k in _SIDE_FIELDS[side])
            absent = [k for k in _SIDE_FIELDS[side] if _blank(getattr(rec, k))]
            if side == "und" and _blank(rec.image):
                absent.append("image")
            if absent:
                problem("missing field", side, f"{', '.join(absent)} missing")
            else:
                refs = [rec.image] if side == "und" else [a, b]
                for ref in refs:
                    bad = check_image(ref)
                    if bad:
                        problem(bad[0], side, bad[1])
                        break
                if len(found) == n_before:
                    if side == "und" and a.strip() == b.strip():
                        problem("equal pair", side, f"caption_chosen == caption_rejected ({a.strip()[:60]!r})")
                    elif side == "gen" and (how := same_image(a, b)):
                        problem("equal pair", side, f"image_chosen and image_rejected are the same image ({how}: "
                                f"{a!r}, {b!r})")
                if len(found) == n_before:
                    texts = ([("caption_chosen", a), ("caption_rejected", b)] if side == "und"
                             else [("prompt", rec.prompt)])
                    budget = caption_budget if side == "und" else prompt_budget
                    for name, text in texts:
                        n = len((caption_ids if side == "und" else prompt_ids)(text_tokenizer, text))
                        if n > budget:
                            if truncate:
                                report.truncated += 1
                            else:
                                problem("too long", side, f"{name} has {n} tokens, over the budget of {budget}")
                                break
            if len(found) > n_before:
                lost[side] = found[n_before]
        report.problems += found
        keeps = [s for s in ("und", "gen") if (rec.has_und if s == "und" else rec.has_gen) and s not in lost]
        if not keeps:
            report.dropped[found[0].kind] += 1
            continue
        for side, p in lost.items():
            report.sides_dropped[(side, p.kind)] += 1
        cleared = {k: None for side in lost for k in _SIDE_FIELDS[side]}
        report.kept.append(dataclasses.replace(rec, **cleared) if cleared else rec)

    if strict and report.problems:
        n = len(report.problems)
        listed = "\n".join(f"  {p}" for p in report.problems[:MAX_LISTED])
        more = f"\n  … and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
        counts = ", ".join(f"{c:,} {k}" for k, c in _by_kind(Counter(p.kind for p in report.problems)))
        raise UserError(f"{source}: {n:,} problem(s) in {report.total:,} records ({counts}):\n{listed}{more}")
    return report
