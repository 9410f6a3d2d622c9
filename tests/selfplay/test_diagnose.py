"""Round diagnostics on hand-made candidates whose judge answers are known: pass@k exact (Codex's estimator), the
self-VQA vs judge agreement and correlation, the judge on the pairs' chosen vs rejected images, kept / dropped; the
round folder is only read; a round from another world seed, real data and missing files are named."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from hermesflow_fast.errors import UserError
from hermesflow_fast.selfplay.diagnose import (
    RecordOutcome,
    diagnose_round,
    pair_diagnostics,
    pass_at_k,
    pearson,
    summarize,
    world_records,
)
from hermesflow_fast.selfplay.report import format_diagnostics
from hermesflow_fast.world import CATEGORIES, JUDGE


def test_pass_at_k_is_the_chance_that_k_samples_drawn_without_replacement_hold_a_right_one():
    for n in range(1, 7):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(flags, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(6, 2, 1) == pytest.approx(2 / 6) and pass_at_k(6, 1, 6) == 1.0 and pass_at_k(6, 0, 6) == 0.0
    for bad in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pearson_matches_numpy_and_is_none_when_a_side_is_constant():
    rng = np.random.default_rng(0)
    x, y = rng.random(20), rng.random(20)
    assert pearson(list(x), list(y)) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [0, 1, 2]) is None and pearson([1.0], [2.0]) is None


T, F = [True, True], [True, False]  # a fully right sample and a half right one (two questions)


def test_summarize_hand_made_outcomes():
    outs = [RecordOutcome("a", "colors", [T, T, F], [1.0, 0.5, 0.0]),  # judge c=2; self-VQA ranks sample 0 first
            RecordOutcome("b", "colors", [F, F, F], [1.0, 1.0, 1.0]),  # judge c=0; self-VQA ties (all "right")
            RecordOutcome("c", "position", [T, F, F], [0.0, 1.0, 0.5])]  # judge c=1; self-VQA picks a wrong one
    s = summarize(outs, CATEGORIES)
    assert list(s) == ["colors", "position", "all"]
    a = s["all"]
    assert (a["records"], a["candidates"]) == (3, 9)
    assert a["judge"]["pass_at_1"] == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert a["judge"]["pass_at_m"] == pytest.approx(2 / 3)
    assert a["judge"]["question_accuracy"] == pytest.approx(12 / 18)
    assert a["judge"]["self_vqa_pick"] == pytest.approx(1 / 3)
    assert a["self_vqa"]["pass_at_1"] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert a["self_vqa"]["pass_at_m"] == 1.0 and a["self_vqa"]["ties"] == pytest.approx(1 / 3)
    # fully right, self vs judge: a 1/1 0/1 0/0, b 1/0 1/0 1/0, c 0/1 1/0 0/0
    assert a["agreement"] == pytest.approx(3 / 9)
    self_scores = [1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5]
    judge_scores = [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5]
    assert a["pearson"] == pytest.approx(np.corrcoef(self_scores, judge_scores)[0, 1])
    assert s["colors"]["judge"]["pass_at_m"] == 0.5 and s["position"]["judge"]["pass_at_1"] == pytest.approx(1 / 3)
    # without a judge or without self-VQA the other side's figures remain
    alone = summarize([RecordOutcome("a", "all", None, [1.0, 0.0])])["all"]
    assert alone["judge"] is None and alone["agreement"] is None and alone["self_vqa"]["pass_at_1"] == 0.5


def test_pair_diagnostics_counts_the_judges_preference():
    pairs = [{"id": "a", "gen": {"chosen": [1], "rejected": [0], "scores": [1.0, 0.5]}},
             {"id": "b", "gen": {"chosen": [0], "rejected": [1], "scores": [0.8, 0.2]},
              "und": {"chosen": "x", "rejected": "y", "scores": [0.9, 0.1]}},
             {"id": "c", "gen": {"chosen": [1], "rejected": [1], "scores": [0.7, 0.0]}}]
    stats = {"records": 5, "und": {"dropped": {"tie": 4}}, "gen": {"dropped": {"tie": 1, "below threshold": 1}}}
    p = pair_diagnostics(pairs, stats, lambda rid, grid: float(grid[0]))
    g = p["gen"]
    assert (p["records"], g["kept"], g["dropped"]) == (5, 3, {"tie": 1, "below threshold": 1})
    assert g["judge_chosen"] == pytest.approx(2 / 3) and g["judge_rejected"] == pytest.approx(2 / 3)
    assert (g["judge_prefers_chosen"], g["judge_ties"], g["judge_prefers_rejected"]) == (1, 1, 1)
    assert g["score_chosen"] == pytest.approx(2.5 / 3) and p["und"]["kept"] == 1 and p["und"]["dropped"] == {"tie": 4}
    unjudged = pair_diagnostics(pairs, None)
    assert "judge_chosen" not in unjudged["gen"] and unjudged["records"] is None and unjudged["gen"]["dropped"] is None


# --- a round folder by hand ---------------------------------------------------------------------------------------


class LookupTokenizer:
    """Decodes a grid to the image its first code names: 0 = blank, 1 + i = record i's render."""

    device = "cpu"

    def __init__(self, records):
        imgs = [np.zeros((32, 32, 3), np.uint8)] + [r.render() for r in records]
        self.images = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in imgs])
        self.calls = 0

    def decode(self, codes):
        self.calls += 1
        return self.images[codes[:, 0]]


B = 0  # the blank image
PLAN = [  # per record: which image each of its 3 samples shows ("T" its own render, B blank), self-VQA's scores
    ("TTB", [1.0, 0.5, 0.0]), ("BBB", [1.0, 1.0, 1.0]), ("TBB", [0.0, 1.0, 0.5]),
    ("TTT", [1.0, 1.0, 1.0]), ("BTB", [0.5, 1.0, 0.0]), ("BBT", [0.0, 0.0, 0.0])]


def _grid(record_index: int, kind: str, tail: int = 0) -> list[int]:
    return [B if kind == "B" else 1 + record_index, tail, tail, tail]


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture
def round_dir(tmp_path):
    recs = list(world_records([f"train-{i:06d}" for i in range(6)], 0).values())
    (tmp_path / "config.yaml").write_text("world:\n  seed: 0\n")
    rd = tmp_path / "round-2"
    rd.mkdir()
    _write(rd / "gen_candidates.jsonl",
           [{"id": r.id, "images": [_grid(i, k) for k in kinds]} for i, (r, (kinds, _)) in enumerate(zip(recs, PLAN))])
    _write(rd / "gen_scores.jsonl", [{"id": r.id, "accuracy": s} for r, (_, s) in zip(recs, PLAN)])
    (rd / "gen_candidates.done").write_text("")
    _write(rd / "pairs.jsonl", [
        {"id": recs[0].id, "prompt": recs[0].prompt, "gen": {"chosen": _grid(0, "T"), "rejected": _grid(0, "B"),
                                                              "scores": [1.0, 0.0]},
         "und": {"chosen": "a", "rejected": "b", "scores": [1.0, 0.5]}},
        # Eq. 10 keeps last round's winner as the loser: a grid not among this round's candidates (decoded apart)
        {"id": recs[2].id, "prompt": recs[2].prompt, "gen": {"chosen": _grid(2, "B"), "rejected": _grid(2, "T", 9),
                                                              "scores": [1.0, 0.5]}}])
    (rd / "stats.json").write_text(json.dumps({"records": 6, "pairs": 2, "und": {"kept": 1, "dropped": {"tie": 5}},
                                               "gen": {"kept": 2, "dropped": {"tie": 3, "winner not better": 1}}}))
    return rd, recs


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_diagnostics_are_exact_and_read_only(round_dir):
    rd, recs = round_dir
    blank_scores = [JUDGE.score(np.zeros((32, 32, 3), np.uint8), r.questions) for r in recs]
    assert all(JUDGE.score(r.render(), r.questions) == 1.0 for r in recs) and max(blank_scores) < 1.0
    (rd / "gen_scores.jsonl").open("a").write('{"id": "train-0000')  # a torn last line: noted, never cut off
    before = _snapshot(rd.parent)
    tok = LookupTokenizer(recs)
    d = diagnose_round(rd, tok, decode_batch=4)
    assert _snapshot(rd.parent) == before
    assert tok.calls == math.ceil(18 / 4) + 1  # candidates in batches of 4, then the one pair grid not among them
    assert d["source"] == "shapes world, seed 0" and (d["records"], d["samples_per_record"]) == (6, 3)
    a = d["categories"]["all"]
    assert a["judge"]["pass_at_1"] == pytest.approx((2 / 3 + 0 + 1 / 3 + 1 + 1 / 3 + 1 / 3) / 6)
    assert a["judge"]["pass_at_m"] == pytest.approx(5 / 6)
    assert a["judge"]["self_vqa_pick"] == pytest.approx(3 / 6)  # records 0, 3, 4
    assert a["self_vqa"]["pass_at_1"] == pytest.approx(0.5) and a["self_vqa"]["pass_at_m"] == pytest.approx(5 / 6)
    assert a["self_vqa"]["ties"] == pytest.approx(0.5) and a["agreement"] == pytest.approx(11 / 18)
    judge = [1.0 if k == "T" else blank_scores[i] for i, (kinds, _) in enumerate(PLAN) for k in kinds]
    assert a["pearson"] == pytest.approx(np.corrcoef([x for _, s in PLAN for x in s], judge)[0, 1])
    assert list(d["categories"]) == [*CATEGORIES, "all"]  # record i is CATEGORIES[i % 6]
    assert d["categories"][CATEGORIES[2]]["judge"]["pass_at_1"] == pytest.approx(1 / 3)
    g = d["pairs"]["gen"]
    assert (g["kept"], g["dropped"]) == (2, {"tie": 3, "winner not better": 1})
    assert g["judge_chosen"] == pytest.approx((1.0 + blank_scores[2]) / 2)
    assert g["judge_rejected"] == pytest.approx((blank_scores[0] + 1.0) / 2)
    assert (g["judge_prefers_chosen"], g["judge_prefers_rejected"]) == (1, 1)
    assert d["unavailable"] == [] and any("incomplete" in n for n in d["notes"])
    assert any("checked against 2 prompt(s)" in n for n in d["notes"])
    md = format_diagnostics(d)
    assert "| **all** | 6 | 0.444 | 0.833 |" in md and "| gen | 2 | tie 3, winner not better 1 |" in md
    assert "ranks first is fully right for 0.500 (better than a random sample)" in md
    json.dumps(d)  # what summary.json and --out hold


def test_bad_rounds_are_named_and_left_as_they_were(round_dir, tmp_path):
    rd, recs = round_dir
    before = _snapshot(rd.parent)
    with pytest.raises(UserError, match=r"pairs\.jsonl: record 'train-000000' has prompt .* world seed 5 "
                                        r"\(--world-seed\) .* another world seed"):
        diagnose_round(rd, LookupTokenizer(recs), world_seed=5)
    empty = tmp_path / "round-1"
    empty.mkdir()
    with pytest.raises(UserError, match=r"round-1/gen_candidates\.jsonl does not exist: the round has no generated"):
        diagnose_round(empty, LookupTokenizer(recs))
    (empty / "gen_candidates.jsonl").write_text("\n")
    with pytest.raises(UserError, match="gen_candidates.jsonl holds no records"):
        diagnose_round(empty, LookupTokenizer(recs))
    assert _snapshot(rd.parent) == {**before, "round-1/gen_candidates.jsonl": b"\n"}


def test_real_data_reports_what_self_vqa_gives_and_says_what_it_cannot(round_dir):
    rd, recs = round_dir
    (rd.parent / "config.yaml").write_text("data:\n  records: data/records.jsonl\n")
    before = _snapshot(rd.parent)
    tok = LookupTokenizer(recs)
    d = diagnose_round(rd, tok)
    assert tok.calls == 0 and d["source"] == "real data" and list(d["categories"]) == ["all"]
    a = d["categories"]["all"]
    assert a["judge"] is None and a["agreement"] is None and a["self_vqa"]["pass_at_m"] == pytest.approx(5 / 6)
    assert "judge_chosen" not in d["pairs"]["gen"] and d["pairs"]["gen"]["kept"] == 2
    assert len(d["unavailable"]) == 1 and "config.yaml sets data.records=data/records.jsonl" in d["unavailable"][0]
    assert "Not available:" in format_diagnostics(d) and "Self-consistency" in format_diagnostics(d)
    (rd / "gen_scores.jsonl").unlink()
    with pytest.raises(UserError, match=r"gen_scores\.jsonl does not exist and the round has no judge .*data\.records"):
        diagnose_round(rd, tok)
    assert _snapshot(rd.parent) == {k: v for k, v in before.items() if k != "round-2/gen_scores.jsonl"}
