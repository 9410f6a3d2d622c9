"""Preference pairs from scored candidates: round 1 (best vs worst) and the self-play update of later rounds.

Round 1, per record and side (HermesFlow §3.6, with its filters actually applied):

    win = first argmax_k s_k,  lose = first argmin_k s_k
    dropped if max == min ("tie"), or, with a threshold τ (generation: 0.6), if max ≤ τ ("below threshold")

Round r ≥ 2, the paper's Eq. (10), against the record's round r−1 pair (w', l'):

    y* = first argmax over the new candidates
    (win, lose) = (y*, w')  if s(y*) > s(w')   else   (y*, l')
    dropped if s(win) ≤ s(lose) ("winner not better"): Eq. 10's else-branch only guarantees s(y*) ≤ s(w'), so the
    new winner can be no better than the kept loser; such a pair would teach the wrong preference.

A record without candidates is dropped as "no candidates"; one without a previous pair in round r ≥ 2 falls back
to the round-1 rule. Every drop is counted by reason; nothing is reused from another record (joins are by id).

    python -m pytest -q tests/selfplay/test_preference_pairs.py
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Choice", "DROP_REASONS", "first_round_pair", "self_play_pair"]

DROP_REASONS = ("no candidates", "tie", "below threshold", "winner not better")


@dataclass(frozen=True)
class Choice:
    """One side of a pair: the candidate (caption text or image ref/codes key) and its score."""

    item: Any
    score: float


def _best_worst(candidates: Sequence[Any], scores: Sequence[float]) -> tuple[int, int]:
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first index of the max
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))  # first index of the min
    return best, worst


def first_round_pair(candidates: Sequence[Any], scores: Sequence[float], threshold: float | None = None,
                     drops: Counter | None = None) -> tuple[Choice, Choice] | None:
    """(win, lose) from one record's scored candidates, or None (the reason counted in ``drops``)."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    reason = None
    if not candidates:
        reason = "no candidates"
    else:
        b, w = _best_worst(candidates, scores)
        if scores[b] == scores[w]:
            reason = "tie"
        elif threshold is not None and not scores[b] > threshold:
            reason = "below threshold"
    if reason is not None:
        if drops is not None:
            drops[reason] += 1
        return None
    return Choice(candidates[b], float(scores[b])), Choice(candidates[w], float(scores[w]))


def self_play_pair(candidates: Sequence[Any], scores: Sequence[float], previous: tuple[Choice, Choice] | None,
                   threshold: float | None = None, drops: Counter | None = None) -> tuple[Choice, Choice] | None:
    """Eq. (10) against the record's previous pair; the round-1 rule when there is none."""
    if previous is None:
        return first_round_pair(candidates, scores, threshold, drops)
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    if not candidates:
        if drops is not None:
            drops["no candidates"] += 1
        return None
    b, _ = _best_worst(candidates, scores)
    new = Choice(candidates[b], float(scores[b]))
    prev_w, prev_l = previous
    lose = prev_w if new.score > prev_w.score else prev_l
    if not new.score > lose.score:
        if drops is not None:
            drops["winner not better"] += 1
        return None
    return new, lose
