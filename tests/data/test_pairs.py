"""Pair schema: JSONL round trip, errors that name file:line, atomic writes, and the HermesFlow importer (the README's
array and the scripts' object stream give the same records)."""

from __future__ import annotations

import json

import pytest

from hermesflow_fast.data.pairs import (
    DEFAULT_QUESTION,
    HERMESFLOW_FIELDS,
    PairRecord,
    derived_id,
    import_hermesflow,
    read_pairs,
    write_pairs,
)


def _hermesflow_records(n: int = 3) -> list[dict]:
    """Records shaped like HermesFlow's README."""
    out = []
    for i in range(n):
        out.append({
            "id": 200 + i, "img_path": f"datasets/journeydb/initial_images/{200 + i}.jpg",
            "prompt": f"journeydb prompt {i}", "caption": f"a red square number {i}",
            "caption_win": f" a red square {i}", "caption_lose": f" a blue thing {i}",
            "bert_score_win": 0.953, "bert_score_lose": 0.596,
            "image_win": f"datasets/journeydb/generated_images/{200 + i}/3.png",
            "image_lose": f"datasets/journeydb/generated_images/{200 + i}/11.png",
            "vqa_score_win": 1.0, "vqa_score_lose": 0.25,
        })
    return out


def test_jsonl_round_trip_keeps_every_field(tmp_path):
    recs = [
        PairRecord("a", "a red square", "imgs/a.png", "y_w", "y_l", "cache:a/w", "cache:a/l", scores={"s": 0.5}),
        PairRecord("b", "a blue circle", "imgs/b.png", "y_w", "y_l", question="What is it?"),  # und side only
        PairRecord("c", "two shapes", image_chosen="g/c0.png", image_rejected="g/c1.png"),  # gen side only
    ]
    f = tmp_path / "pairs.jsonl"
    write_pairs(f, recs)
    back = read_pairs(f)
    assert back == recs and [r.line for r in back] == [1, 2, 3]
    assert [(r.has_und, r.has_gen) for r in back] == [(True, True), (True, False), (False, True)]
    assert back[0].question_text == DEFAULT_QUESTION and back[1].question_text == "What is it?"
    first = json.loads(f.read_text().splitlines()[0])
    assert "question" not in first and first["scores"] == {"s": 0.5}
    assert list(tmp_path.iterdir()) == [f]  # no temp file left behind


def test_write_is_atomic_when_a_record_fails(tmp_path):
    f = tmp_path / "pairs.jsonl"
    write_pairs(f, [PairRecord("a", "p", "x.png", "w", "l")])
    before = f.read_text()
    bad = PairRecord("b", "p", "x.png", "w", "l", scores={"s": object()})  # not JSON-serializable
    with pytest.raises(TypeError):
        write_pairs(f, [PairRecord("c", "p", "x.png", "w", "l"), bad])
    assert f.read_text() == before and list(tmp_path.iterdir()) == [f]


@pytest.mark.parametrize("line, match", [
    ('{"id": "a", "prompt": "p"', r"pairs\.jsonl:3: not JSON"),
    ('["a", "b"]', r"pairs\.jsonl:3: expected a JSON object"),
    ('{"id": "a", "prompt": "p", "caption_choosen": "x"}', r"pairs\.jsonl:3: unknown field\(s\) \['caption_choosen'\]"),
    ('{"id": "a", "prompt": 5}', r"pairs\.jsonl:3: field 'prompt' must be a string"),
    ('{"id": "a", "prompt": "p", "scores": {"s": "high"}}', r"pairs\.jsonl:3: \"scores\" must be an object of numbers"),
])
def test_read_errors_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"id": "ok", "prompt": "p"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_pairs(f)


def test_int_id_is_read_as_string(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"id": 7, "prompt": "p", "image": "x.png", "caption_chosen": "w", "caption_rejected": "l"}\n')
    assert read_pairs(f)[0].id == "7"


def test_hermesflow_array_and_stream_import_the_same_records(tmp_path):
    recs = _hermesflow_records()
    array = tmp_path / "pair_dpo_data.json"
    array.write_text(json.dumps(recs, indent=4))
    stream = tmp_path / "pair_dpo_data_stream.json"  # what get_dpo_data.py appends: pretty objects + ",\n"
    stream.write_text("".join(json.dumps(r, indent=4) + ",\n" for r in recs))
    a, s = import_hermesflow(array), import_hermesflow(stream)
    assert a == s and len(a) == 3
    r = a[1]
    assert r == PairRecord(
        id="201", prompt="a red square number 1", image="datasets/journeydb/initial_images/201.jpg",
        caption_chosen=" a red square 1", caption_rejected=" a blue thing 1",
        image_chosen="datasets/journeydb/generated_images/201/3.png",
        image_rejected="datasets/journeydb/generated_images/201/11.png",
        scores={"und_chosen": 0.953, "und_rejected": 0.596, "gen_chosen": 1.0, "gen_rejected": 0.25})
    assert s[1].line == 1 + json.dumps(recs[0], indent=4).count("\n") + 1  # the line the object starts on
    assert a[0].line == 2  # "[" on line 1


def test_hermesflow_mapping_covers_the_readme_schema():
    readme_keys = set(_hermesflow_records(1)[0])
    assert readme_keys == set(HERMESFLOW_FIELDS)
    assert HERMESFLOW_FIELDS["caption"] == "prompt" and HERMESFLOW_FIELDS["prompt"] is None


def test_hermesflow_without_id_gets_a_stable_derived_id_and_root_makes_paths_absolute(tmp_path):
    recs = _hermesflow_records(2)
    for r in recs:
        del r["id"]
    f = tmp_path / "pair_dpo_data.json"
    f.write_text(json.dumps(recs))
    got = import_hermesflow(f, root=tmp_path / "HermesFlow")
    want = derived_id("datasets/journeydb/initial_images/200.jpg", "a red square number 0")
    assert got[0].id == want and len(want) == 12 and got[0].id != got[1].id
    assert got[0].id == import_hermesflow(f)[0].id  # independent of root
    assert got[0].image == str(tmp_path / "HermesFlow" / "datasets/journeydb/initial_images/200.jpg")


def test_hermesflow_stream_with_two_runs_appended_keeps_duplicates_for_validation(tmp_path):
    recs = _hermesflow_records(2)
    f = tmp_path / "s.json"
    f.write_text(("".join(json.dumps(r) + ",\n" for r in recs)) * 2)
    got = import_hermesflow(f)
    assert [r.id for r in got] == ["200", "201", "200", "201"] and [r.line for r in got] == [1, 2, 3, 4]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))  # JSON Lines (no commas) reads the same
    assert import_hermesflow(f) == got[:2]


@pytest.mark.parametrize("text, match", [
    ('{"id": 1, "caption": "x"},\n{"id": 2, "caption": "y" oops},\n', r"s\.json:2:\d+ \(byte offset \d+\): not JSON"),
    ('[{"id": 1, "caption": "x"}\n{"id": 2, "caption": "y"}]', r"s\.json:2:1 .*expected ',' between objects"),
    ('[{"id": 1, "caption": "x"},\n', r"s\.json:2:1 .*array is not closed"),
    ('{"id": 1, "caption": "x"},\n7,\n', r"s\.json:2:1 .*expected a JSON object"),
    ('{"id": 1, "caption": "x", "caption_mmu": ["a"]},\n', r"s\.json:1: unknown HermesFlow key\(s\) \['caption_mmu'\]"),
])
def test_hermesflow_parse_errors_name_line_and_byte_offset(tmp_path, text, match):
    f = tmp_path / "s.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        import_hermesflow(f)


def test_hermesflow_byte_offset_counts_utf8_bytes(tmp_path):
    f = tmp_path / "s.json"
    text = '{"id": 1, "caption": "café"} junk'
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"byte offset {len(text[:text.index('junk')].encode())}\)"):
        import_hermesflow(f)
