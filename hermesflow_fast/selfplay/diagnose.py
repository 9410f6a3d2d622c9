"""Why a self-play round helped or not: diagnostics of one round folder, read-only.

What self-play can fix is bounded by two things (DESIGN.md): the model must sometimes generate a right image
(headroom), and its self-VQA must recognise it (ranking). Per round, from ``gen_candidates.jsonl`` (M token grids per
record), ``gen_scores.jsonl`` (self-VQA accuracy per grid), ``pairs.jsonl`` and ``stats.json``:

    judge          the shapes world's judge answers each record's questions on every decoded candidate
    fully right    a candidate whose every question is answered right (by the judge; by self-VQA: accuracy 1.0)
    pass@k         per record with n samples of which c are fully right, Codex's unbiased estimator
                   1 − C(n−c, k) / C(n, k); averaged over records. pass@1 = mean over records and samples of
                   "fully right" (c / n); pass@M = fraction of records with at least one fully-right sample
    question acc.  the judge's accuracy over all (candidate, question), as the evaluation's ``gen``
    score          per candidate, the fraction of its questions answered right (judge: on pixels; self-VQA: the
                   model's own answers, ``gen_scores.jsonl``)
    self-VQA pick  the judge's pass on the candidate self-VQA ranks first (first argmax, as the pairs take it):
                   between pass@1 (a random pick) and pass@M (a perfect pick)
    ties           fraction of records whose M candidates share one self-VQA score (no preference to learn)
    agreement      fraction of candidates where self-VQA's "fully right" equals the judge's
    Pearson r      Pearson's correlation between self-VQA's score and the judge's score over candidates (null when
                   either is constant)
    pairs          per side (und, gen) the pairs kept and the drops by reason (``stats.json``); for generation
                   pairs the judge's mean score of the chosen vs the rejected image, and how often it prefers each

Every figure is per record category (GenEval's six for the world) and over "all". Real data (``data.records`` in
the run's config.yaml) has no judge: the figures self-VQA gives alone are reported (its pass@1 / pass@M, its mean
score = self-consistency, the fraction of the model's own answers about its images that match its prompt's facts;
ties, pairs) and ``unavailable`` says what is missing and why.

Candidates are decoded to pixels in batches (``decode_batch`` grids per decode) and judged in memory; nothing is
written to the round folder. The self-play run keeps the result in each round's eval.json (and so summary.json)
under "diagnostics".

    hermesflow diagnose runs/demo/round-1 [--out diag.json | diag.md] [--world-seed S] [--model DIR]
    python -m pytest -q tests/selfplay/test_diagnose.py
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hermesflow_fast.errors import UserError
from hermesflow_fast.io import read_jsonl, write_atomic

__all__ = ["RecordOutcome", "RoundSource", "diagnose_command", "diagnose_round", "judge_grids", "pair_diagnostics",
           "pass_at_k", "pearson", "round_source", "summarize", "world_records"]

WORLD_ID = re.compile(r"^train-(\d{6})$")
ALL = "all"
# what a round writes (rounds.py): ``--out`` never overwrites one of these
ROUND_FILES = re.compile(r"^(.*\.jsonl|.*\.done|stats\.json|eval\.json|samples\.png|.*\.tmp)$")
ROUND_FOLDERS = ("model", "train", "images")


# --- the math ---------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Codex's unbiased pass@k of one record: 1 − C(n−c, k) / C(n, k), n samples of which c are right, 1 ≤ k ≤ n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r of two equally long sequences; None with fewer than two points or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} vs {len(y)} values")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


@dataclass
class RecordOutcome:
    """One record's candidates: the judge's right/wrong per (sample, question), self-VQA's accuracy per sample."""

    id: str
    category: str
    judge: list[list[bool]] | None = None  # (M, questions); None without a judge
    self_vqa: list[float] | None = None  # (M,); None without gen_scores

    @property
    def samples(self) -> int:
        return len(self.judge) if self.judge is not None else len(self.self_vqa or [])


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _first_argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _judge_full(o: RecordOutcome) -> list[bool]:
    return [all(q) for q in o.judge]


def _self_full(o: RecordOutcome) -> list[bool]:
    return [s >= 1.0 - 1e-9 for s in o.self_vqa]


def _passes(fulls: list[list[bool]]) -> dict[str, float | None]:
    """pass@1 and pass@M over records, from each record's fully-right flags."""
    fulls = [f for f in fulls if f]
    if not fulls:
        return {"pass_at_1": None, "pass_at_m": None}
    return {"pass_at_1": _mean([pass_at_k(len(f), sum(f), 1) for f in fulls]),
            "pass_at_m": _mean([pass_at_k(len(f), sum(f), len(f)) for f in fulls])}


def _group(outcomes: list[RecordOutcome]) -> dict[str, Any]:
    judged = [o for o in outcomes if o.judge is not None]
    selfed = [o for o in outcomes if o.self_vqa is not None]
    both = [o for o in judged if o.self_vqa is not None and len(o.self_vqa) == len(o.judge)]
    out: dict[str, Any] = {"records": len(outcomes), "candidates": sum(o.samples for o in outcomes)}
    if judged:
        right = [x for o in judged for q in o.judge for x in q]
        out["judge"] = {**_passes([_judge_full(o) for o in judged]),
                        "question_accuracy": _mean([float(x) for x in right]),
                        "mean_score": _mean([sum(q) / len(q) if q else 0.0 for o in judged for q in o.judge]),
                        "self_vqa_pick": _mean([float(_judge_full(o)[_first_argmax(o.self_vqa)]) for o in both])}
    else:
        out["judge"] = None
    if selfed:
        out["self_vqa"] = {**_passes([_self_full(o) for o in selfed]),
                           "mean_score": _mean([s for o in selfed for s in o.self_vqa]),
                           "ties": _mean([float(len(set(o.self_vqa)) == 1) for o in selfed if o.self_vqa])}
    else:
        out["self_vqa"] = None
    if both:
        agree = [float(a == b) for o in both for a, b in zip(_judge_full(o), _self_full(o))]
        js = [sum(q) / len(q) if q else 0.0 for o in both for q in o.judge]
        ss = [s for o in both for s in o.self_vqa]
        out["agreement"], out["pearson"] = _mean(agree), pearson(ss, js)
    else:
        out["agreement"] = out["pearson"] = None
    return out


def summarize(outcomes: Sequence[RecordOutcome], categories: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per category (``categories`` first, in that order, then any other seen, sorted) and "all": records,
    candidates, "judge" {pass_at_1, pass_at_m, question_accuracy, mean_score, self_vqa_pick} (None without a judge),
    "self_vqa" {pass_at_1, pass_at_m, mean_score, ties} (None without self-VQA), agreement, pearson."""
    by: dict[str, list[RecordOutcome]] = defaultdict(list)
    for o in outcomes:
        by[o.category].append(o)
    order = [c for c in categories if c in by] + sorted(c for c in by if c not in categories)
    out = {c: _group(by[c]) for c in order}
    out[ALL] = _group(list(outcomes))
    return out


def pair_diagnostics(pairs: Sequence[dict], stats: dict | None,
                     judge_score: Callable[[str, list[int]], float | None] | None = None) -> dict[str, Any]:
    """Kept / dropped per side from ``pairs.jsonl``'s lines and ``stats.json`` (None: drops unknown), the pairs'
    own scores (self-VQA for gen, the caption scorer for und) and, with ``judge_score(id, grid)``, the judge's
    score of each generation pair's chosen and rejected image (a pair it cannot score, None, is left out)."""
    out: dict[str, Any] = {"records": stats.get("records") if stats else None}
    for side in ("und", "gen"):
        got = [(p["id"], p[side]) for p in pairs if p.get(side)]
        d: dict[str, Any] = {"kept": len(got), "dropped": dict((stats or {}).get(side, {}).get("dropped", {}))
                             if stats else None,
                             "score_chosen": _mean([float(s["scores"][0]) for _, s in got]),
                             "score_rejected": _mean([float(s["scores"][1]) for _, s in got])}
        if side == "gen" and judge_score is not None:
            judged = [(judge_score(rid, s["chosen"]), judge_score(rid, s["rejected"])) for rid, s in got]
            judged = [(a, b) for a, b in judged if a is not None and b is not None]
            jc, jr = [a for a, _ in judged], [b for _, b in judged]
            d.update(judge_chosen=_mean(jc), judge_rejected=_mean(jr),
                     judge_prefers_chosen=sum(a > b for a, b in zip(jc, jr)),
                     judge_ties=sum(a == b for a, b in zip(jc, jr)),
                     judge_prefers_rejected=sum(a < b for a, b in zip(jc, jr)))
        out[side] = d
    return out


# --- the round folder, read-only --------------------------------------------------------------------------------------


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """Every complete line of a JSONL journal; a torn last line (a stage killed mid-write) is skipped and noted,
    never cut off (``Journal`` would truncate the file)."""

    def torn() -> None:
        notes.append(f"{path}: its last line is incomplete (the stage was interrupted); it is not counted")

    out = []
    for n, rec in read_jsonl(path, tail="skip", on_torn=torn, errors="replace", error=UserError):
        if not isinstance(rec, dict) or "id" not in rec:
            raise UserError(f"{path}:{n}: a record without an id")
        out.append(rec)
    return out


@dataclass
class RoundSource:
    """Where a round's records come from: the shapes world (seed, and what said so) or real data (no judge)."""

    world: bool
    seed: int | None = None
    seed_from: str = ""  # "config.yaml" / "--world-seed" / "the default"
    real_reason: str = ""  # why the round is taken as real data
    base: str | None = None  # the run's world.base (None: the shipped base)


def round_source(round_dir: str | os.PathLike, world_seed: int | None = None,
                 ids: Sequence[str] = ()) -> RoundSource:
    """Read ``round_dir/../config.yaml`` (the run's config, saved by ``hermesflow selfplay``): real data when it sets
    ``data.records``; else the world with its ``world.seed`` (``world_seed`` overrides). Without a config, ids of
    the form "train-000123" are taken as the world's (seed ``world_seed`` or 0), others as real data."""
    from hermesflow_fast.selfplay.config import SelfPlayConfig
    from hermesflow_fast.train.config import load_config

    config = Path(round_dir).parent / "config.yaml"
    if config.is_file():
        cfg = load_config(config, [], schema=SelfPlayConfig)
        if cfg.data.records is not None:
            return RoundSource(False, real_reason=f"{config} sets data.records={cfg.data.records} (real data)",
                               base=cfg.world.base)
        if world_seed is None:
            return RoundSource(True, cfg.world.seed, f"world.seed in {config}", base=cfg.world.base)
        return RoundSource(True, world_seed, "--world-seed", base=cfg.world.base)
    if ids and not all(WORLD_ID.match(i) for i in ids):
        bad = next(i for i in ids if not WORLD_ID.match(i))
        return RoundSource(False, real_reason=f"no {config} and record ids such as {bad!r} are not shapes-world ids "
                                              f"(real data)")
    if world_seed is None:
        return RoundSource(True, 0, f"the default (no {config}; pass --world-seed if the run used another)")
    return RoundSource(True, world_seed, "--world-seed")


def world_records(ids: Sequence[str], seed: int, where: str = "the round") -> dict[str, Any]:
    """The shapes world's train records of ``ids`` ("train-000123" → record 123 of ``make_records(·, seed)``)."""
    from hermesflow_fast.world.records import make_record

    out = {}
    for rid in ids:
        m = WORLD_ID.match(rid)
        if m is None:
            raise UserError(f"{where}: record id {rid!r} is not a shapes-world train id (train-NNNNNN)")
        out[rid] = make_record(seed, "train", int(m.group(1)))
    return out


def judge_grids(image_tokenizer, grids: torch.Tensor, questions: Sequence[Sequence[Any]], judge=None,
                decode_batch: int = 256) -> list[list[bool]]:
    """Decode (B, N) token grids in batches of ``decode_batch`` and let the judge answer each grid's questions →
    [grid][question] right or wrong. The pixels are rounded to uint8 as ``evaluate`` does (identical answers)."""
    from hermesflow_fast.model.tokenizer_vq import images_to_uint8
    from hermesflow_fast.world.judge import JUDGE

    judge = judge or JUDGE
    out: list[list[bool]] = []
    for i in range(0, len(grids), decode_batch):
        with torch.no_grad():
            pixels = images_to_uint8(image_tokenizer.decode(grids[i:i + decode_batch].to(image_tokenizer.device)))
        for j, img in enumerate(pixels.numpy()):  # (H, W, 3) uint8
            qs = questions[i + j]
            out.append([a == q.answer for a, q in zip(judge.answers(img, qs), qs)])
    return out


def _check_seed(pairs: list[dict], records: dict[str, Any], path: Path, src: RoundSource) -> str:
    """The pairs' prompts must be the prompts of the records the seed makes (a round from another world seed, or
    real data whose ids look like the world's, is refused by name)."""
    checked = 0
    for p in pairs:
        r = records.get(p["id"])
        if r is None or "prompt" not in p:
            continue
        if p["prompt"] != r.prompt:
            raise UserError(f"{path}: record {p['id']!r} has prompt {p['prompt']!r}, but world seed {src.seed} "
                            f"({src.seed_from}) makes {r.prompt!r}: the round comes from another world seed; pass "
                            f"--world-seed with the run's world.seed")
        checked += 1
    return f"world seed {src.seed} ({src.seed_from}) checked against {checked} prompt(s) of {path.name}" if checked \
        else f"world seed {src.seed} ({src.seed_from}) not checked: {path.name} holds no prompt"


def diagnose_round(round_dir: str | os.PathLike, image_tokenizer=None, *, world_seed: int | None = None,
                   source: RoundSource | None = None, judge=None, decode_batch: int = 256) -> dict[str, Any]:
    """The diagnostics of one round folder (see the module docstring), read-only. ``image_tokenizer`` decodes the
    grids for the judge (the shapes world; None: the judge's figures are unavailable); ``source``: where the
    records come from (default ``round_source(round_dir, world_seed, ids)``). A missing or empty
    gen_candidates.jsonl, a round from another world seed, or nothing to report is a ``UserError`` naming the file."""
    from hermesflow_fast.world.scene import CATEGORIES

    rd = Path(round_dir)
    notes: list[str] = []
    unavailable: list[str] = []
    cand_path = rd / "gen_candidates.jsonl"
    if not rd.is_dir():
        raise UserError(f"{rd} is not a folder; expected a self-play round folder (run_dir/round-R)")
    if not cand_path.is_file():
        shards = sorted(p.name for p in rd.glob("gen_candidates.rank*.jsonl"))
        why = f"only per-rank shards {shards}: the stage is unfinished" if shards else \
            "run the round's gen_candidates stage first"
        raise UserError(f"{cand_path} does not exist: the round has no generated candidates ({why})")
    cands = _read_jsonl(cand_path, notes)
    if not cands:
        raise UserError(f"{cand_path} holds no records: the round has no generated candidates")
    for c in cands:
        if not isinstance(c.get("images"), list) or not c["images"]:
            raise UserError(f"{cand_path}: record {c['id']!r} has no images")
    if not (rd / "gen_candidates.done").is_file():
        notes.append(f"{rd / 'gen_candidates.done'} is absent: the stage is unfinished; {len(cands)} record(s) so far")
    ids = [str(c["id"]) for c in cands]
    src = source or round_source(rd, world_seed, ids)

    scores_path = rd / "gen_scores.jsonl"
    selfs: dict[str, list[float]] = {}
    if scores_path.is_file():
        selfs = {str(s["id"]): [float(x) for x in s.get("accuracy", [])] for s in _read_jsonl(scores_path, notes)}
        missing = [i for i in ids if i not in selfs]
        if missing:
            notes.append(f"{scores_path}: no self-VQA scores for {len(missing)} record(s), e.g. {missing[0]!r}")
    else:
        unavailable.append(f"self-VQA figures, agreement and correlation: {scores_path} does not exist (run the "
                           f"round's gen_scores stage)")
    pairs_path, stats_path = rd / "pairs.jsonl", rd / "stats.json"
    pairs = _read_jsonl(pairs_path, notes) if pairs_path.is_file() else []
    stats = None
    if stats_path.is_file():
        try:
            stats = json.loads(stats_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{stats_path}: not valid JSON ({exc.msg})") from None
    if not pairs_path.is_file():
        unavailable.append(f"pairs kept / dropped: {pairs_path} does not exist (run the round's pairs stage)")
    elif stats is None:
        notes.append(f"{stats_path} does not exist: the drops by reason are unknown")

    records: dict[str, Any] = {}
    judged = src.world and image_tokenizer is not None
    if src.world:
        records = world_records(ids, src.seed, str(cand_path))
        if pairs_path.is_file():
            notes.append(_check_seed(pairs, records, pairs_path, src))
        if image_tokenizer is None:
            unavailable.append("the judge's figures: no image tokenizer was given to decode the candidates")
    else:
        unavailable.append(f"the judge's figures (pass@1 / pass@M by the judge, agreement, correlation, the judge on "
                           f"self-VQA's winners vs losers): no judge, {src.real_reason}; the shapes world's judge "
                           f"reads only its own scenes")
    if not judged and not selfs:
        why = src.real_reason or "no image tokenizer to decode its candidates"
        raise UserError(f"{scores_path} does not exist and the round has no judge ({why}): nothing to diagnose")

    judge_of: dict[str, list[list[bool]]] = {}
    if judged:
        try:
            grids = torch.tensor([g for c in cands for g in c["images"]])  # (Σ M, N)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"{cand_path}: the token grids are not lists of integers of one length") from None
        qs = [records[c["id"]].questions for c in cands for _ in c["images"]]
        right = judge_grids(image_tokenizer, grids, qs, judge, decode_batch)
        k = 0
        for c in cands:
            judge_of[c["id"]] = right[k:k + len(c["images"])]
            k += len(c["images"])
    outcomes = []
    for c in cands:
        rid = c["id"]
        s = selfs.get(rid)
        if s is not None and len(s) != len(c["images"]):
            raise UserError(f"{scores_path}: record {rid!r} has {len(s)} scores for {len(c['images'])} images")
        outcomes.append(RecordOutcome(rid, records[rid].category if src.world else ALL, judge_of.get(rid), s))

    judge_score = None
    if judged:
        known = {(c["id"], tuple(g)): sum(r) / len(r) if r else 0.0
                 for c in cands for g, r in zip(c["images"], judge_of[c["id"]])}
        extra = [(p["id"], p["gen"][k]) for p in pairs if p.get("gen") and p["id"] in records
                 for k in ("chosen", "rejected") if (p["id"], tuple(p["gen"][k])) not in known]
        if extra:  # round ≥ 2: a loser kept from the previous round's pair is not among this round's candidates
            right = judge_grids(image_tokenizer, torch.tensor([g for _, g in extra]),
                                [records[i].questions for i, _ in extra], judge, decode_batch)
            known.update({(i, tuple(g)): sum(r) / len(r) if r else 0.0 for (i, g), r in zip(extra, right)})

        def judge_score(rid: str, grid: list[int]) -> float | None:
            return known.get((rid, tuple(grid)))

    per_record = Counter(len(c["images"]) for c in cands)
    return {
        "round_dir": str(rd),
        "source": f"shapes world, seed {src.seed}" if src.world else "real data",
        "records": len(cands),
        "samples_per_record": next(iter(per_record)) if len(per_record) == 1 else sorted(per_record),
        "categories": summarize(outcomes, CATEGORIES if src.world else ()),
        "pairs": pair_diagnostics(pairs, stats, judge_score) if pairs_path.is_file() else None,
        "unavailable": unavailable,
        "notes": notes,
    }


# --- the command ------------------------------------------------------------------------------------------------------


def _check_out(out: Path, rd: Path) -> None:
    """``--out`` may not overwrite a file the round wrote (its journals, stats, eval, model, training run, images)."""
    try:
        rel = out.resolve().relative_to(rd.resolve())
    except ValueError:
        return
    if rel.parts and (rel.parts[0] in ROUND_FOLDERS or (len(rel.parts) == 1 and ROUND_FILES.match(rel.name))):
        raise UserError(f"--out {out} is a file of the round {rd} (its curation, pairs, evaluation or model); "
                        f"write the diagnostics elsewhere")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; expected a file name (.json: JSON, else markdown)")


def _heldout(rd: Path) -> str | None:
    """One line on the held-out scores of this round and the one before (their eval.json), when both exist."""
    m = re.match(r"^round-(\d+)$", rd.name)
    if m is None or int(m.group(1)) < 1:
        return None
    prev = rd.parent / f"round-{int(m.group(1)) - 1}" / "eval.json"
    try:
        a, b = json.loads(prev.read_text()), json.loads((rd / "eval.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if a.get("gen") is None or b.get("gen") is None:
        return None
    return (f"Held-out (eval.json): gen {a['gen']:.3f} → {b['gen']:.3f}, und {a['und']:.3f} → {b['und']:.3f} "
            f"({prev.parent.name} → {rd.name}).")


def diagnose_command(round_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                     world_seed: int | None = None, out: str | os.PathLike | None = None,
                     decode_batch: int = 256) -> str:
    """``hermesflow diagnose``: the markdown of ``diagnose_round`` on ``round_dir`` (returned, to print), written to
    ``out`` when given (``.json``: the dict; else the markdown), atomically. Nothing in the round folder changes.
    ``model``: the world model folder whose ``vq/`` decodes the grids (default: the run's world.base, else the
    shipped base)."""
    from hermesflow_fast.model.tokenizer_vq import load_image_tokenizer
    from hermesflow_fast.selfplay.report import DEFINITIONS, format_diagnostics
    from hermesflow_fast.world.shipped import BASE_DIR

    rd = Path(round_dir)
    if decode_batch < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {decode_batch}")
    if out is not None:
        _check_out(Path(out), rd)
    if not rd.is_dir():
        raise UserError(f"{rd} is not a folder; expected a self-play round folder (run_dir/round-R)")
    cand_path = rd / "gen_candidates.jsonl"
    ids = [str(c["id"]) for c in _read_jsonl(cand_path, [])] if cand_path.is_file() else []
    src = round_source(rd, world_seed, ids)
    tokenizer = None
    if src.world and ids:
        folder = Path(model or src.base or BASE_DIR)
        if not (folder / "vq").is_dir():
            raise UserError(f"{folder / 'vq'} does not exist: --model must be a world model folder (with vq/) whose "
                            f"image tokenizer decodes the round's grids")
        tokenizer = load_image_tokenizer(folder / "vq")
    d = diagnose_round(rd, tokenizer, source=src, decode_batch=decode_batch)
    text = format_diagnostics(d)
    held = _heldout(rd)
    if held:
        text += f"\n\n{held}"
    text += f"\n\n{DEFINITIONS}\n"
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(d, indent=1) + "\n" if out.suffix == ".json" else text)
    return text
