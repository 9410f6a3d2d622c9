"""Pair rules: round 1 best vs worst with ties and the threshold dropped; Eq. 10 on hand-made cases, including the
winner-not-better case the paper's rule lets through."""

from collections import Counter

import pytest

from hermesflow_fast.selfplay.pair_rules import Choice, first_round_pair, self_play_pair


def test_first_round_best_vs_worst_first_index_on_ties():
    drops = Counter()
    pair = first_round_pair(["a", "b", "c", "d"], [0.2, 0.9, 0.1, 0.9], drops=drops)
    assert pair == (Choice("b", 0.9), Choice("c", 0.1)) and not drops


def test_first_round_drops_are_counted():
    drops = Counter()
    assert first_round_pair([], [], drops=drops) is None
    assert first_round_pair(["x", "y"], [0.5, 0.5], drops=drops) is None
    assert first_round_pair(["x", "y"], [0.6, 0.1], threshold=0.6, drops=drops) is None  # max must exceed 0.6
    assert first_round_pair(["x", "y"], [0.61, 0.1], threshold=0.6, drops=drops) is not None
    assert drops == Counter({"no candidates": 1, "tie": 1, "below threshold": 1})


def test_eq10_new_best_beats_previous_winner():
    prev = (Choice("w1", 0.7), Choice("l1", 0.2))
    pair = self_play_pair(["n1", "n2"], [0.8, 0.3], prev)
    assert pair == (Choice("n1", 0.8), Choice("w1", 0.7))  # the old winner becomes the loser


def test_eq10_else_branch_keeps_previous_loser():
    prev = (Choice("w1", 0.7), Choice("l1", 0.2))
    pair = self_play_pair(["n1", "n2"], [0.5, 0.6], prev)
    assert pair == (Choice("n2", 0.6), Choice("l1", 0.2))


def test_eq10_winner_not_better_is_dropped():
    drops = Counter()
    prev = (Choice("w1", 0.7), Choice("l1", 0.4))
    assert self_play_pair(["n1"], [0.3], prev, drops=drops) is None  # 0.3 ≤ the kept loser's 0.4
    assert self_play_pair(["n1"], [0.4], prev, drops=drops) is None  # equal is not better either
    assert drops == Counter({"winner not better": 2})


def test_eq10_without_previous_pair_uses_round_one_rule():
    assert self_play_pair(["a", "b"], [0.9, 0.1], None, threshold=0.6) == (Choice("a", 0.9), Choice("b", 0.1))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 candidates but 1 scores"):
        first_round_pair(["a", "b"], [0.1])
