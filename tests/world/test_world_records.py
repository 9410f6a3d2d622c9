"""Records of the shapes world: seeded and split-disjoint, balanced over GenEval's categories, questions that agree
with the scene and only ask what the caption states, a JSONL + PNG round trip with file:line errors, a word
tokenizer with no unknown word, and the dataset command."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from hermesflow_fast.data.text import UNK_TOKEN, build_word_tokenizer, load_text_tokenizer, und_prompt_ids
from hermesflow_fast.world.__main__ import main
from hermesflow_fast.world.grammar import caption
from hermesflow_fast.world.judge import Detection, Judge
from hermesflow_fast.world.questions import QUESTION_CATEGORIES, parse_question
from hermesflow_fast.world.records import make_records, read_records, write_records
from hermesflow_fast.world.scene import CATEGORIES
from hermesflow_fast.world.vocabulary import world_words


@pytest.fixture(scope="module")
def records():
    return make_records(600, seed=0)


def test_records_are_deterministic_and_prefix_stable(records):
    assert make_records(600, seed=0) == records
    assert make_records(50, seed=0) == records[:50]
    assert make_records(50, seed=1) != records[:50]


def test_splits_are_disjoint(records):
    heldout = make_records(600, seed=0, split="heldout")
    assert not {r.id for r in records} & {r.id for r in heldout}
    assert all(r.id.startswith("train-") for r in records) and all(r.id.startswith("heldout-") for r in heldout)
    same_scene = sum(a.scene == b.scene for a, b in zip(records, heldout))
    assert same_scene < 30  # other streams: the scenes (with their jitter) differ
    with pytest.raises(ValueError, match="split"):
        make_records(1, 0, split="test")


def test_categories_are_balanced(records):
    counts = Counter(r.category for r in records)
    assert set(counts) == set(CATEGORIES) and len(set(counts.values())) == 1


def _truth(record) -> list[Detection]:
    """The scene's objects as a perfect judge would see them."""
    return [Detection(o.shape, o.colour, o.x, o.y, o.size, o.size, o.size**2, 1.0, 0.0, 1.0)
            for o in record.scene.objects]


def test_questions_agree_with_the_scene(records):
    per_category = Counter()
    for r in records:
        assert r.caption == caption(r.scene) and r.prompt == r.caption
        ids = [q.id for q in r.questions]
        assert len(set(ids)) == len(ids) and all(i.startswith(r.id + "-q") for i in ids)
        for q in r.questions:
            per_category[q.category] += 1
            assert q.answer in q.choices and q.category in QUESTION_CATEGORIES
            assert Judge.answer_detections(_truth(r), q) == q.answer, (r.caption, q.text)
        cats = {q.category for q in r.questions}
        assert ("position" in cats) == (r.scene.relation is not None)  # only what the caption states
        if r.scene.kind == "pair":
            assert cats >= {"two_object", "counting", "color_attr"}
        else:
            assert cats == {"single_object", "colors", "counting"}
    assert set(per_category) == set(QUESTION_CATEGORIES)


def test_questions_name_only_the_caption_s_objects(records):
    for r in records:
        shapes = {o.shape for o in r.scene.objects}
        for q in r.questions:
            form = parse_question(q.text)
            if form.shape is not None and not (form.kind == "exists" and q.answer == "no"):
                assert form.shape in shapes and form.shape in r.caption
            if form.kind == "relation":
                assert f"{form.colour} {form.shape}" in r.caption and " ".join(form.other) in r.caption


def test_write_read_round_trip(records, tmp_path):
    path = write_records(tmp_path / "sets" / "train.jsonl", records[:30], tmp_path / "images" / "train")
    back = read_records(path)
    assert [(r.id, r.category, r.scene, r.caption, r.prompt, r.questions) for r in back] == \
        [(r.id, r.category, r.scene, r.caption, r.prompt, r.questions) for r in records[:30]]
    row = json.loads(path.read_text().splitlines()[0])
    assert row["image"] == f"../images/train/{records[0].id}.png"
    assert set(row) >= {"id", "caption", "prompt", "image", "questions"}
    for r in back[:5]:
        assert r.image.is_file()
        assert np.array_equal(np.asarray(Image.open(r.image)), r.render())


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not JSON"),
    ('["a list"]', "JSON object"),
    ('{"id": "x"}', "missing field"),
    ("CAPTION", "not a caption"),
    ("QUESTION", "bad scene or questions"),
    ("DUPLICATE", "repeats line 1"),
])
def test_read_errors_name_file_and_line(records, tmp_path, bad, message):
    path = write_records(tmp_path / "r.jsonl", records[:2], tmp_path / "img")
    first, second = path.read_text().splitlines()
    row = json.loads(second)
    if bad == "CAPTION":
        row["caption"] = "a purple circle"
        bad = json.dumps(row)
    elif bad == "QUESTION":
        row["questions"][0]["answer"] = "maybe"
        bad = json.dumps(row)
    elif bad == "DUPLICATE":
        bad = first
    path.write_text(first + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=rf"r\.jsonl:2: .*{message}"):
        read_records(path)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_tokenizer_covers_every_word(records, tmp_path):
    tok = build_word_tokenizer(world_words(), tmp_path / "tok")
    unk = tok.convert_tokens_to_ids(UNK_TOKEN)
    texts = set()
    for r in records + make_records(120, seed=0, split="heldout"):
        texts |= {r.caption, r.prompt, " " + r.caption}
        for q in r.questions:
            texts |= {q.text, q.prompt, q.answer, *q.choices}
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and unk not in ids, text
        assert tok.decode(ids).replace(" ?", "?").replace(" ,", ",").replace(" :", ":") == text.strip()
    for q in records[0].questions:
        assert unk not in und_prompt_ids(tok, q.prompt)


def test_dataset_command(tmp_path, capsys):
    out = tmp_path / "shapes"
    main(["--records", "12", "--heldout", "6", "--seed", "0", "--out", str(out)])
    train, heldout = read_records(out / "train.jsonl"), read_records(out / "heldout.jsonl")
    assert len(train) == 12 and len(heldout) == 6
    assert all(r.image.is_file() for r in train + heldout)
    assert len(list((out / "images" / "train").glob("*.png"))) == 12
    tok = load_text_tokenizer(out / "tokenizer")
    assert UNK_TOKEN not in tok.tokenize(train[0].caption)
    assert "train: 12 records" in capsys.readouterr().out
