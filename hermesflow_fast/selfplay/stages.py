"""The curation stages of one self-play round, each resumable (a Journal per stage, joins by record id):

    und_candidates   K captions per real image: greedy + top-k × temperature grid (the paper's code: greedy, then
                     top-k ∈ {2,3,4} × temperature ∈ {0.1, 0.7, 2.0}); KV-cached, batched over records
    und_scores       each caption scored against the record's truth (pluggable ``caption_scorer``; the world's is
                     exact attribute agreement)
    gen_candidates   M images per prompt: batched MaskGIT with CFG, kept as token grids; decoded to PNG only
                     with ``images_dir`` (for people and pixel-reading judges: ``save_candidate_images``)
    gen_scores       self-VQA: the same model answers the record's questions about each of its generated images
                     (token grids go straight in), free-form answers mapped to a choice; score = accuracy
    pairs            winner/loser per side (round 1: best vs worst, generation needs best > threshold; round ≥ 2:
                     Eq. 10 against the previous round's pairs), drops counted by reason → pairs.jsonl, stats.json

Randomness is drawn per record (a generator seeded by (record id, round, stage, seed)), so results do not depend on
batching or on how records are sharded over ranks. A journal written under other settings (caption grid, images per
prompt) is refused, naming the record, rather than continued into a mix of both.

    python -m pytest -q tests/selfplay/test_stages.py
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hermesflow_fast.data.text import prompt_ids, und_prompt_ids
from hermesflow_fast.errors import UserError
from hermesflow_fast.io import atomic_path, write_atomic
from hermesflow_fast.model.generate import generate_answers, generate_images, generate_text
from hermesflow_fast.model.tokenizer_vq import images_to_uint8
from hermesflow_fast.seeding import hashed_generator
from hermesflow_fast.selfplay.config import CurationSection
from hermesflow_fast.selfplay.journal import Journal
from hermesflow_fast.selfplay.pair_rules import Choice, self_play_pair

__all__ = ["CurationRecord", "build_pairs", "curation_generator", "export_candidate_images", "gen_candidates",
           "gen_scores", "image_folder", "reencode", "save_candidate_images", "und_candidates", "und_scores",
           "vqa_question"]


@dataclass
class CurationRecord:
    """What curation needs of a record: the real image's codes, the prompt, questions, and the truth to score."""

    id: str
    prompt: str
    image_codes: Tensor  # (N,)
    questions: list[Any]  # objects with .prompt, .choices, .answer, .category
    truth: Any = None  # what caption_scorer compares against (the world: the Scene)


def curation_generator(record_id: str, round_: int, stage: str, seed: int, device="cpu") -> torch.Generator:
    """The generator of one record's draws in ``stage`` of round ``round_``: seeded by sha256 of all four."""
    return hashed_generator("selfplay", stage, record_id, round_, seed, device=device)


def _todo(records: Sequence[CurationRecord], journal: Journal) -> list[CurationRecord]:
    return [r for r in records if r.id not in journal]


def _check_written(journal: Journal, key: str, want: Any, got: Callable[[dict], Any]) -> None:
    """Refuse to continue a journal whose records were written under another setting ``key`` (a stage resumed
    with other settings would mix, e.g., 3-image and 5-image records)."""
    for rec in journal:
        if got(rec) != want:
            raise UserError(f"{journal.path}: record {rec['id']!r} was written with {key}={got(rec)!r}, but this run "
                            f"asks for {want!r}; finish the stage with the settings it began with, or start another "
                            f"run dir")


def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _device(wm) -> torch.device:
    return wm.model.lm_head.weight.device


def und_candidates(wm, records: Sequence[CurationRecord], journal: Journal, s: CurationSection, round_: int,
                   seed: int, progress: Callable[[int], None] | None = None) -> Journal:
    """K = len(caption_grid) captions per record → {"id", "captions": [str], "settings": [[top_k, temperature]]}.
    ``seed``: the run's (``run.seed``); each record's draws are seeded by (id, round, caption index, seed)."""
    tok, dev = wm.text_tokenizer, _device(wm)
    grid = s.grid()
    _check_written(journal, "caption_grid", [list(x) for x in grid], lambda rec: rec.get("settings"))
    q = und_prompt_ids(tok, s.caption_question)
    for batch in _batches(_todo(records, journal), s.batch_size):
        codes = torch.stack([r.image_codes for r in batch]).to(dev)
        caps: list[list[str]] = [[] for _ in batch]
        for j, (k, t) in enumerate(grid):
            gens = [curation_generator(r.id, round_, f"caption{j}", seed) for r in batch]
            out = generate_text(wm.model, wm.layout, codes, [q] * len(batch), max_new_tokens=s.caption_tokens,
                                temperature=t, top_k=None if t <= 0 else k, generator=gens)
            for i, ids in enumerate(out):
                caps[i].append(tok.decode(ids, skip_special_tokens=True).strip())
        for r, c in zip(batch, caps):
            journal.append({"id": r.id, "captions": c, "settings": [list(x) for x in grid]})
        if progress:
            progress(len(batch))
    return journal


def und_scores(records: Sequence[CurationRecord], candidates: Journal, journal: Journal,
               caption_scorer: Callable[[str, Any], float]) -> Journal:
    """Each caption scored against the record's truth → {"id", "scores": [float]}. A scorer with ``score_many(captions,
    truth)`` (selfplay/scorers.py: embeddings) gets a record's captions in one call."""
    cands = candidates.records()
    many = getattr(caption_scorer, "score_many", None)
    for r in _todo(records, journal):
        if r.id not in cands:
            raise ValueError(f"{candidates.path}: no captions for record {r.id!r}; run und_candidates first")
        caps = cands[r.id]["captions"]
        scores = many(caps, r.truth) if many is not None else [caption_scorer(c, r.truth) for c in caps]
        journal.append({"id": r.id, "scores": [float(x) for x in scores]})
    return journal


def image_folder(record_id: str) -> str:
    """The folder name of a record's images: the id itself when it is a plain file name, else the id with every other
    character as "_" plus 8 hex digits of its hash (so ids never escape the folder and never collide)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)
    if safe == record_id and safe not in (".", ".."):
        return safe
    return f"{safe}-{hashlib.sha256(record_id.encode()).hexdigest()[:8]}"


def save_candidate_images(image_tokenizer, record_id: str, codes: Tensor, out_dir: str | Path) -> list[Path]:
    """Decode a record's generated token grids (M, N) to ``out_dir/<image_folder(id)>/{0..M-1}.png`` (the original
    code's ``generated_images/{id}/{k}.png`` layout); returns the paths. Each file is written whole (a temporary
    name, then a rename), so a killed run never leaves a truncated PNG."""
    from PIL import Image

    folder = Path(out_dir) / image_folder(record_id)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        arr = images_to_uint8(image_tokenizer.decode(codes.to(image_tokenizer.device))).numpy()  # (M, H, W, 3)
    paths = []
    for k, a in enumerate(arr):
        path = folder / f"{k}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(a).save(tmp, format="PNG")
        paths.append(path)
    return paths


def export_candidate_images(image_tokenizer, candidates: Journal, out_dir: str | Path) -> int:
    """Every record of a finished ``gen_candidates`` journal to PNGs under ``out_dir`` → the number of images."""
    n = 0
    for rec in candidates:
        n += len(save_candidate_images(image_tokenizer, rec["id"], torch.tensor(rec["images"]), out_dir))
    return n


def gen_candidates(wm, records: Sequence[CurationRecord], journal: Journal, s: CurationSection, round_: int,
                   seed: int, progress: Callable[[int], None] | None = None,
                   images_dir: str | Path | None = None) -> Journal:
    """M images per prompt as token grids → {"id", "images": [[code, …] × M]}. With ``images_dir`` each record's
    images are also written as PNGs there (``save_candidate_images``) before its journal line."""
    tok = wm.text_tokenizer
    _check_written(journal, "images_per_prompt", s.images_per_prompt, lambda rec: len(rec["images"]))
    N = int(records[0].image_codes.numel()) if records else 0
    for batch in _batches(_todo(records, journal), s.batch_size):
        gens = [curation_generator(r.id, round_, "image", seed) for r in batch]
        texts = [prompt_ids(tok, r.prompt) for r in batch]
        codes = generate_images(wm.model, wm.layout, texts, N, images_per_prompt=s.images_per_prompt, steps=s.steps,
                                guidance_scale=s.guidance_scale, noise_temperature=s.noise_temperature,
                                compounding_noise=s.compounding_noise, generator=gens).cpu()
        M = s.images_per_prompt
        for i, r in enumerate(batch):
            grids = codes[i * M:(i + 1) * M]
            if images_dir is not None:
                save_candidate_images(wm.image_tokenizer, r.id, grids, images_dir)
            journal.append({"id": r.id, "images": grids.tolist()})
        if progress:
            progress(len(batch))
    return journal


def vqa_question(question: Any, style: str) -> str:
    """The self-VQA instruction put as "USER: {instruction} ASSISTANT:": ``plain`` → ``question.prompt``
    ("{text} choices: a, b"); ``hermesflow`` → the original's "\\nQuestion:{text} Choice:['a', 'b']" (the choices
    as a Python list)."""
    if style == "plain":
        return question.prompt
    if style == "hermesflow":
        return f"\nQuestion:{question.text} Choice:{list(question.choices)!s}"
    raise ValueError(f"vqa_question: style must be 'plain' or 'hermesflow', got {style!r}")


@torch.no_grad()
def reencode(image_tokenizer, codes: Tensor) -> Tensor:
    """(B, N) codes → decoded to 8-bit RGB pixels (what a saved PNG holds) → normalized to [−1, 1] as
    (x/255 − 0.5)/0.5 → encoded again (B, N): the image the original's self-VQA reads back from disk."""
    px = images_to_uint8(image_tokenizer.decode(codes.to(image_tokenizer.device)))  # (B, H, W, 3) uint8
    x = (px.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    return image_tokenizer.encode(x.to(image_tokenizer.device)).cpu().long()


def gen_scores(wm, records: Sequence[CurationRecord], candidates: Journal, journal: Journal, s: CurationSection,
               answer_match: Callable[[str, Sequence[str]], str | None],
               progress: Callable[[int], None] | None = None) -> Journal:
    """Self-VQA: accuracy of the model's own answers about each generated image → {"id", "accuracy": [float × M]}.

    Greedy answers (as the original); a record without questions is an error naming it (it cannot be scored). Each
    generated image is prefilled once for all its questions (``generate_answers``)."""
    tok, dev = wm.text_tokenizer, _device(wm)
    cands = candidates.records()
    for batch in _batches(_todo(records, journal), max(1, s.batch_size // 4)):
        images, prompts = [], []  # every generated image of the batch, and the prompts about it
        for r in batch:
            if not r.questions:
                raise ValueError(f"record {r.id!r} has no questions: its generated images cannot be scored")
            if r.id not in cands:
                raise ValueError(f"{candidates.path}: no images for record {r.id!r}; run gen_candidates first")
            qs = [und_prompt_ids(tok, vqa_question(q, s.vqa_prompt)) for q in r.questions]
            images += cands[r.id]["images"]
            prompts += [qs] * len(cands[r.id]["images"])
        grids = torch.tensor(images)
        if s.reencode_images:
            grids = reencode(wm.image_tokenizer, grids)
        answers = generate_answers(wm.model, wm.layout, grids.to(dev), prompts,
                                   max_new_tokens=s.answer_tokens)  # [image][question] → tokens
        k = 0
        for r in batch:
            M = len(cands[r.id]["images"])
            right = [[int(answer_match(tok.decode(ids, skip_special_tokens=True).strip(), q.choices) == q.answer)
                      for ids, q in zip(said, r.questions)] for said in answers[k:k + M]]  # (M, questions)
            k += M
            journal.append({"id": r.id, "accuracy": [sum(x) / len(x) for x in right]})
        if progress:
            progress(len(batch))
    return journal


def build_pairs(records: Sequence[CurationRecord], und_cands: Journal, und_sc: Journal, gen_cands: Journal,
                gen_sc: Journal, previous: dict[str, dict] | None, threshold: float, out: Path) -> dict:
    """Pairs per side for every record → ``out`` (JSONL, one line per record with at least one side) and the stats
    (returned and written beside it as stats.json)."""
    drops = {"und": Counter(), "gen": Counter()}
    kept = {"und": 0, "gen": 0}
    score_sums = {"und": [0.0, 0.0], "gen": [0.0, 0.0]}
    uc, us, gc, gs = und_cands.records(), und_sc.records(), gen_cands.records(), gen_sc.records()
    for j, got in ((und_cands, uc), (und_sc, us), (gen_cands, gc), (gen_sc, gs)):
        missing = [r.id for r in records if r.id not in got]
        if missing:
            raise ValueError(f"{j.path}: {len(missing)} record(s) missing, e.g. {missing[:3]}; finish that stage first")
    lines = []
    for r in records:
        prev = (previous or {}).get(r.id, {})
        rec: dict[str, Any] = {"id": r.id, "prompt": r.prompt}
        sides = (("und", uc[r.id]["captions"], us[r.id]["scores"], None),
                 ("gen", gc[r.id]["images"], gs[r.id]["accuracy"], threshold))
        for side, cands, scores, thr in sides:
            p = prev.get(side)
            old = (Choice(p["chosen"], p["scores"][0]), Choice(p["rejected"], p["scores"][1])) if p else None
            pair = self_play_pair(cands, scores, old, thr, drops[side])
            if pair is None:
                continue
            w, lo = pair
            rec[side] = {"chosen": w.item, "rejected": lo.item, "scores": [w.score, lo.score]}
            kept[side] += 1
            score_sums[side][0] += w.score
            score_sums[side][1] += lo.score
        if "und" in rec or "gen" in rec:
            lines.append(rec)
    write_atomic(out, "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
    stats = {"records": len(records), "pairs": len(lines)}
    for side in ("und", "gen"):
        n = kept[side]
        stats[side] = {"kept": n, "dropped": dict(drops[side]),
                       "mean_score_chosen": score_sums[side][0] / n if n else None,
                       "mean_score_rejected": score_sums[side][1] / n if n else None}
    (out.parent / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats
