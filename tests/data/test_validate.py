"""Pair validation: each problem kind counted and named with file:line:id, sides dropped independently, strict mode
raises with the first 20 problems and the total, and nothing is replaced."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from hermesflow_fast.data.pairs import PairRecord, read_pairs, write_pairs  # noqa: E402
from hermesflow_fast.data.text import build_word_tokenizer  # noqa: E402
from hermesflow_fast.data.validate import validate_pairs  # noqa: E402

WORDS = ["a red square", "a blue circle", "green triangle left of"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_word_tokenizer(WORDS, tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("x1", "x2", "w1", "l1", "w2", "l2"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return tmp_path


CACHE = {"c1": torch.tensor([1, 2, 3]), "c2": torch.tensor([3, 2, 1]), "c3": torch.tensor([1, 2, 3])}


def _rec(rid, und=("a red square", "a blue circle"), gen=("w1.png", "l1.png"), image="x1.png", prompt="a red square"):
    cw, cl = und if und else (None, None)
    gw, gl = gen if gen else (None, None)
    return PairRecord(rid, prompt, image, cw, cl, gw, gl)


def _records():
    return [
        _rec("ok"),                                                      # line 1
        _rec("eq-und", und=("a red square", " a red square ")),         # 2 und dropped
        _rec("eq-gen", gen=("w1.png", "./w1.png")),                      # 3 gen dropped
        _rec("eq-both", und=("a blue circle",) * 2, gen=("w2.png", "w2.png")),  # 4 record dropped
        _rec("no-real-image", image="gone.png"),                         # 5 und dropped (missing image)
        _rec("no-gen-image", gen=("w2.png", "gone.png")),                # 6 gen dropped
        _rec("broken", image="broken.png", gen=None),                    # 7 record dropped (unreadable)
        _rec("ok"),                                                      # 8 duplicate id
        PairRecord("half", "a red square", "x1.png", "a red square"),    # 9 missing caption_rejected -> dropped
        _rec("cache-ok", gen=("cache:c1", "cache:c2")),                  # 10 kept
        _rec("cache-miss", gen=("cache:c1", "cache:nope")),              # 11 gen dropped
        _rec("cache-eq", gen=("cache:c1", "cache:c3"), und=None),        # 12 equal codes -> record dropped
        _rec("long", und=("a red square " * 5, "a blue circle")),        # 13 caption of 15 tokens
        _rec("nothing", und=None, gen=None),                             # 14 no side
        _rec("no-prompt", prompt=" "),                                   # 15 missing field
    ]


def _validate(root, tok, **kw):
    f = root / "pairs.jsonl"
    write_pairs(f, _records())
    args = dict(root=root, text_tokenizer=tok, caption_budget=10, truncate=False, strict=False, token_cache=CACHE)
    return validate_pairs(read_pairs(f), f, **{**args, **kw}), f


def test_counts_per_kind_and_sides(root, tok):
    rep, _ = _validate(root, tok)
    kept = {r.id: (r.has_und, r.has_gen) for r in rep.kept}
    assert kept == {
        "ok": (True, True), "eq-und": (False, True), "eq-gen": (True, False), "no-real-image": (False, True),
        "no-gen-image": (True, False), "cache-ok": (True, True), "cache-miss": (True, False), "long": (False, True),
    }
    assert rep.total == 15 and dict(rep.dropped) == {
        "equal pair": 2, "unreadable image": 1, "duplicate id": 1, "missing field": 2, "no side": 1}
    assert dict(rep.sides_dropped) == {
        ("und", "equal pair"): 1, ("gen", "equal pair"): 1, ("und", "missing image"): 1, ("gen", "missing image"): 2,
        ("und", "too long"): 1}
    assert rep.summary() == (
        "kept 8 / 15 (und 5, gen 5); dropped: 2 missing field, 1 duplicate id, 1 unreadable image, 2 equal pair, "
        "1 no side; sides dropped: 2 missing image (gen), 1 missing image (und), 1 equal pair (gen), "
        "1 equal pair (und), 1 too long (und)")


def test_every_problem_names_file_line_and_id(root, tok):
    rep, f = _validate(root, tok)
    by_id = {p.id: p for p in rep.problems}
    assert str(by_id["eq-und"]) == f"{f}:2: id 'eq-und' [und]: equal pair: caption_chosen == caption_rejected " \
                                   f"('a red square')"
    assert by_id["ok"].line == 8 and "already used on line 1" in str(by_id["ok"])
    assert re.search(r"pairs\.jsonl:5: id 'no-real-image' \[und\]: missing image: .*gone\.png does not exist",
                     str(by_id["no-real-image"]))
    assert re.search(r":7: id 'broken' \[und\]: unreadable image: .*broken\.png", str(by_id["broken"]))
    assert "caption_rejected missing" in str(by_id["half"])
    assert "'cache:nope': record 'nope' is not in the token cache" in str(by_id["cache-miss"])
    assert "same image" in str(by_id["cache-eq"])
    assert "caption_chosen has 15 tokens, over the budget of 10" in str(by_id["long"])
    assert by_id["nothing"].kind == "no side"
    assert by_id["no-prompt"].message == "no prompt"


def test_kept_records_are_not_altered_beyond_the_dropped_side(root, tok):
    rep, _ = _validate(root, tok)
    original = {r.id: r for r in _records()}
    for r in rep.kept:
        o = original[r.id]
        assert (r.prompt, r.image, r.line is not None) == (o.prompt, o.image, True)
        if r.has_und:
            assert (r.caption_chosen, r.caption_rejected) == (o.caption_chosen, o.caption_rejected)
        if r.has_gen:
            assert (r.image_chosen, r.image_rejected) == (o.image_chosen, o.image_rejected)


def test_truncate_counts_instead_of_dropping(root, tok):
    rep, _ = _validate(root, tok, truncate=True)
    assert rep.truncated == 1 and ("und", "too long") not in rep.sides_dropped
    assert next(r for r in rep.kept if r.id == "long").has_und
    assert "truncated: 1 text(s) over budget" in rep.summary()
    rep, _ = _validate(root, tok, truncate=False, prompt_budget=2)  # every prompt has 3 tokens
    assert sum(p.kind == "too long" and p.side == "gen" for p in rep.problems) == 5  # every gen side left
    assert rep.sides_dropped[("gen", "too long")] == 2 and rep.dropped["too long"] == 1  # "long" lost both
    assert rep.dropped["equal pair"] == 3  # eq-und: und equal, then gen too long


def test_no_token_cache_makes_cache_refs_missing(root, tok):
    rep, _ = _validate(root, tok, token_cache=None)
    assert any("names a token cache, but none was given" in p.message for p in rep.problems)
    assert "cache-ok" not in {r.id for r in rep.kept if r.has_gen}


def test_image_exists_hook_is_called_once_per_file(root, tok):
    calls = []

    def exists(path):
        calls.append(path.name)
        return path.name != "l1.png"  # pretend l1.png is gone

    rep, _ = _validate(root, tok, image_exists=exists)
    assert len(calls) == len(set(calls))
    assert any(p.kind == "missing image" and "l1.png does not exist" in p.message for p in rep.problems)


def test_strict_raises_with_first_20_and_total(root, tok):
    f = root / "bad.jsonl"
    write_pairs(f, [_rec(f"e{i}", und=("a red square",) * 2, gen=None) for i in range(25)])
    with pytest.raises(ValueError) as info:
        validate_pairs(read_pairs(f), f, root=root, text_tokenizer=tok, caption_budget=10, truncate=False, strict=True)
    msg = str(info.value)
    assert msg.startswith(f"{f}: 25 problem(s) in 25 records (25 equal pair):")
    assert f"{f}:20: id 'e19'" in msg and "e20'" not in msg and "… and 5 more" in msg
    good = root / "good.jsonl"
    write_pairs(good, [_rec("a"), _rec("b", und=("a blue circle", "a red square"))])
    rep = validate_pairs(read_pairs(good), good, root=root, text_tokenizer=tok, caption_budget=10, truncate=False,
                         strict=True)
    assert len(rep.kept) == 2 and rep.summary() == "kept 2 / 2 (und 2, gen 2)"


def test_identical_bytes_under_different_names_is_an_equal_pair(root, tok, monkeypatch):
    import shutil

    from hermesflow_fast.data import validate

    shutil.copy(root / "w1.png", root / "w1-copy.png")
    (root / "same-size.png").write_bytes(bytes(b ^ 0xFF for b in (root / "w1.png").read_bytes()))
    Image.new("RGB", (16, 16), "red").save(root / "other-size.png")
    f = root / "pairs.jsonl"
    write_pairs(f, [_rec("copy", gen=("w1.png", "w1-copy.png")), _rec("copy-again", gen=("w1-copy.png", "w1.png")),
                    _rec("differs", gen=("w1.png", "same-size.png")), _rec("ok", gen=("w2.png", "other-size.png"))])
    hashed = []
    sha256 = validate.hashlib.sha256
    monkeypatch.setattr(validate.hashlib, "sha256", lambda *a: hashed.append(1) or sha256(*a))
    rep = validate_pairs(read_pairs(f), f, root=root, text_tokenizer=tok, caption_budget=10, truncate=False,
                         strict=False, image_exists=lambda p: None)  # same-size.png is no PNG: skip verifying
    by_id = {p.id: p for p in rep.problems}
    assert set(by_id) == {"copy", "copy-again"} and all(p.kind == "equal pair" for p in by_id.values())
    assert "same image (files with identical bytes: 'w1.png', 'w1-copy.png')" in by_id["copy"].message
    assert {r.id: r.has_gen for r in rep.kept} == {"copy": False, "copy-again": False, "differs": True, "ok": True}
    assert len(hashed) == 3  # w1, w1-copy and same-size, once each; files of other sizes are never read


def _hand_made_cache(folder, rows, dtype=torch.uint16, num_codes=512):
    """A token cache of 4-code images written by hand (as another tool or an edit would leave it)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "cache.json").write_text(json.dumps({"num_codes": num_codes, "tokens_per_image": 4, "grid": [2, 2],
                                                   "dtype": "uint16"}))
    save_file({"ids": torch.tensor(rows).to(dtype)}, str(folder / "shard-00000.safetensors"))
    (folder / "index.jsonl").write_text("".join(json.dumps({"id": f"c{i}", "shard": "shard-00000.safetensors",
                                                            "row": i}) + "\n" for i in range(len(rows))))


def test_cached_codes_outside_the_codebook_or_nan_are_named_by_id_and_shard(root, tok):
    from hermesflow_fast.data.token_cache import TokenCache

    _hand_made_cache(root / "cache", [[1, 2, 3, 4], [5, 9999, 7, 8], [9, 10, 11, 12], [500, 1, 2, 3]])
    f = root / "pairs.jsonl"
    write_pairs(f, [_rec("bad", gen=("cache:c0", "cache:c1")), _rec("fine", gen=("cache:c0", "cache:c2")),
                    _rec("real-bad", image="cache:c1", gen=None), _rec("big", gen=("cache:c3", "cache:c2"))])
    kw = dict(root=root, text_tokenizer=tok, caption_budget=10, truncate=False, strict=False)
    rep = validate_pairs(read_pairs(f), f, token_cache=TokenCache(root / "cache"), **kw)
    by_id = {p.id: p for p in rep.problems}
    shard = root / "cache" / "shard-00000.safetensors"
    assert set(by_id) == {"bad", "real-bad"} and {p.kind for p in by_id.values()} == {"bad codes"}
    assert str(by_id["bad"]) == (f"{f}:1: id 'bad' [gen]: bad codes: 'cache:c1': {shard} row 1: code 9999 at "
                                 f"position 1 is outside the codebook [0, 512)")
    assert "1 bad codes" in rep.summary() and [r.id for r in rep.kept] == ["bad", "fine", "big"]
    # a model with fewer image codes than the tokenizer: its own range applies
    rep = validate_pairs(read_pairs(f), f, token_cache=TokenCache(root / "cache"), num_codes=256, **kw)
    assert "code 500 at position 0 is outside the codebook [0, 256)" in {p.id: p for p in rep.problems}["big"].message
    with pytest.raises(ValueError, match=r"2 problem\(s\) in 4 records \(2 bad codes\)"):
        validate_pairs(read_pairs(f), f, token_cache=TokenCache(root / "cache"), **{**kw, "strict": True})
    # a float shard holding NaN, and a plain mapping of codes
    _hand_made_cache(root / "nan", [[1, 2, 3, 4], [5, float("nan"), 7, 8], [9, 10, 11, 12], [1, 1, 1, 1]],
                     dtype=torch.float32)
    rep = validate_pairs(read_pairs(f), f, token_cache=TokenCache(root / "nan"), **kw)
    assert f"{root / 'nan' / 'shard-00000.safetensors'} row 1: nan at position 1" in rep.problems[0].message
    mapping = {"c0": torch.tensor([1.0, 2.0]), "c1": torch.tensor([1.5, 2.0]), "c2": torch.tensor([3, 4]),
               "c3": torch.tensor([-1, 2])}
    rep = validate_pairs(read_pairs(f), f, token_cache=mapping, num_codes=512, **kw)
    messages = {p.id: p.message for p in rep.problems}
    assert "non-integer code 1.5 at position 0" in messages["bad"]
    assert "code -1 at position 0 is outside the codebook [0, 512)" in messages["big"]
