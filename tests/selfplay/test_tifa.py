"""TIFA-format question files: both encodings, the join by record id, and every problem named with file, place, id."""

import json

import pytest

from hermesflow_fast.selfplay.tifa import load_tifa_questions

GOOD = [
    {"id": "r1", "caption": "a dog on grass", "question": "is there a dog?", "choices": ["yes", "no"], "answer": "yes",
     "element_type": "object", "element": "dog"},
    {"id": "r1", "question": "what color is the grass?", "choices": ["green", "red"], "answer": "green",
     "element_type": "color"},
    {"id": "r2", "question": "how many cats?", "choices": ["1", "2", "3"], "answer": "2"},
]


def test_json_array_and_jsonl_give_the_same_questions(tmp_path):
    arr, lines = tmp_path / "q.json", tmp_path / "q.jsonl"
    arr.write_text(json.dumps(GOOD))
    lines.write_text("\n".join(json.dumps(q) for q in GOOD) + "\n")
    a = load_tifa_questions(arr, ["r1", "r2"])
    assert a == load_tifa_questions(lines, ["r1", "r2"])
    assert [q.text for q in a["r1"]] == ["is there a dog?", "what color is the grass?"]
    q = a["r1"][1]
    assert (q.category, q.answer, q.choices) == ("color", "green", ("green", "red"))
    assert q.prompt == "what color is the grass? choices: green, red"
    assert a["r2"][0].category == "other" and len({x.id for v in a.values() for x in v}) == 3


def test_problems_are_named_and_strict_decides(tmp_path):
    bad = GOOD + [
        {"id": "r2", "question": "is it big?", "choices": ["yes", "no"], "answer": "maybe"},
        {"id": "r9", "question": "is it red?", "choices": ["yes", "no"], "answer": "no"},
        {"id": "r1", "choices": ["yes", "no"], "answer": "no"},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in bad) + "\n")
    with pytest.raises(ValueError) as err:
        load_tifa_questions(path, ["r1", "r2", "r3"])
    msg = str(err.value)
    for part in ("answer not among its choices", "q.jsonl:line 4 (id 'r2')", "id matches no record",
                 "line 5 (id 'r9')", "missing question", "line 6", "record without questions", "'r3'"):
        assert part in msg, part
    said = []
    kept = load_tifa_questions(path, ["r1", "r2", "r3"], strict=False, log=said.append)
    assert sum(map(len, kept.values())) == 3 and "dropped" in said[0] and "1 id matches no record" in said[0]


def test_missing_file_and_broken_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tifa_questions(tmp_path / "nope.json")
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: not valid JSON"):
        load_tifa_questions(p)
