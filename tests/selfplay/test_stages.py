"""Curation stages on a tiny random model and a handful of world records: each stage writes one line per record,
resumes without losing or duplicating, draws per record (batching does not change results), and pairs count
their drops; generated grids decode to PNGs only when asked;
self-VQA with one prefill per generated image writes exactly what the row-wise answers gave (there and
on the shipped base)."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from hermesflow_fast.data.text import build_word_tokenizer, und_prompt_ids
from hermesflow_fast.model import Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.model.generate import generate_text
from hermesflow_fast.model.tokenizer_vq import PatchVQTokenizer
from hermesflow_fast.selfplay.config import CurationSection
from hermesflow_fast.selfplay.journal import Journal
from hermesflow_fast.selfplay.stages import (
    CurationRecord,
    build_pairs,
    export_candidate_images,
    gen_candidates,
    gen_scores,
    image_folder,
    und_candidates,
    und_scores,
)
from hermesflow_fast.world import make_records, render, world_words
from hermesflow_fast.world.scoring import answer_match, caption_agreement

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wm(tmp_path_factory):
    root = tmp_path_factory.mktemp("wm")
    tok = build_word_tokenizer(world_words(), root / "tok")
    recs = make_records(6, seed=0)
    imgs = torch.stack([torch.from_numpy(render(r.scene)).permute(2, 0, 1).float() / 127.5 - 1 for r in recs])
    vq = PatchVQTokenizer.fit(imgs, num_codes=32, seed=0, iters=2, patch_size=8)
    vocab = Vocabulary.from_tokenizer(tok, num_image_codes=32)
    torch.manual_seed(0)
    model = UnifiedTransformer(ModelConfig.tiny(vocab_size=vocab.vocab_size)).eval()
    layout = Layout(vocab, t2i_text_len=24, mmu_text_len=40)
    cur = [CurationRecord(r.id, r.prompt, vq.encode(x[None])[0], r.questions, r.scene) for r, x in zip(recs, imgs)]
    return SimpleNamespace(model=model, layout=layout, vocab=vocab, text_tokenizer=tok, image_tokenizer=vq), cur


SETTINGS = CurationSection(caption_grid=[[1, 0.0], [3, 1.0]], images_per_prompt=3, steps=3, guidance_scale=2.0,
                           caption_tokens=6, answer_tokens=2, batch_size=4)


def test_stages_write_one_line_per_record_and_resume(wm, tmp_path):
    w, recs = wm
    uc = Journal(tmp_path / "und_candidates.jsonl")
    und_candidates(w, recs[:2], uc, SETTINGS, 1, 0)  # interrupted after two records
    uc = und_candidates(w, recs, Journal(uc.path), SETTINGS, 1, 0)
    lines = [json.loads(x) for x in uc.path.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.id for r in recs] and all(len(x["captions"]) == 2 for x in lines)
    us = und_scores(recs, Journal(uc.path), Journal(tmp_path / "und_scores.jsonl"), caption_agreement)
    assert all(0 <= s <= 1 for x in us for s in x["scores"])
    gc = gen_candidates(w, recs, Journal(tmp_path / "gen_candidates.jsonl"), SETTINGS, 1, 0)
    assert all(len(x["images"]) == 3 and all(0 <= c < 32 for im in x["images"] for c in im) for x in gc)
    gs = gen_scores(w, recs, gc, Journal(tmp_path / "gen_scores.jsonl"), SETTINGS, answer_match)
    assert all(len(x["accuracy"]) == 3 and all(0 <= a <= 1 for a in x["accuracy"]) for x in gs)
    stats = build_pairs(recs, uc, us, gc, gs, None, 0.6, tmp_path / "pairs.jsonl")
    for side in ("und", "gen"):
        assert stats[side]["kept"] + sum(stats[side]["dropped"].values()) == len(recs)
    assert (tmp_path / "stats.json").is_file()


def test_results_do_not_depend_on_batching(wm, tmp_path):
    w, recs = wm
    one = und_candidates(w, recs, Journal(tmp_path / "a.jsonl"), SETTINGS, 1, 0).records()
    small = replace(SETTINGS, **{"batch_size": 1})
    two = und_candidates(w, recs, Journal(tmp_path / "b.jsonl"), small, 1, 0).records()
    assert one == two
    g1 = gen_candidates(w, recs, Journal(tmp_path / "c.jsonl"), SETTINGS, 1, 0).records()
    g2 = gen_candidates(w, recs[::-1], Journal(tmp_path / "d.jsonl"), small, 1, 0).records()
    assert g1 == g2


def test_generated_images_become_pngs_only_when_asked(wm, tmp_path):
    from PIL import Image

    from hermesflow_fast.world.judge import as_rgb

    w, recs = wm
    plain = gen_candidates(w, recs[:2], Journal(tmp_path / "a.jsonl"), SETTINGS, 1, 0)
    assert not any(tmp_path.rglob("*.png"))  # curation itself never decodes
    out = tmp_path / "images"
    gc = gen_candidates(w, recs[:2], Journal(tmp_path / "b.jsonl"), SETTINGS, 1, 0, images_dir=out)
    assert gc.records() == plain.records()  # the PNGs change nothing in the journal
    for rec in gc:
        pixels = w.image_tokenizer.decode(torch.tensor(rec["images"]))
        files = sorted((out / rec["id"]).iterdir())
        assert [f.name for f in files] == [f"{k}.png" for k in range(SETTINGS.images_per_prompt)]
        for f, px in zip(files, pixels):
            got = as_rgb(Image.open(f))  # what a judge reading the file sees
            assert (got == as_rgb(px)).all()
    # an existing round's journal exports to the same files
    assert export_candidate_images(w.image_tokenizer, gc, tmp_path / "again") == 2 * SETTINGS.images_per_prompt
    for f in out.rglob("*.png"):
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(out)).read_bytes()


def test_a_journal_begun_with_other_settings_is_refused(wm, tmp_path):
    """A stage killed mid-way and resumed with another images_per_prompt or caption grid would mix records of both:
    refused, naming the journal and the record, and nothing is appended."""
    from hermesflow_fast.errors import UserError

    w, recs = wm
    gc = gen_candidates(w, recs[:2], Journal(tmp_path / "g.jsonl"), SETTINGS, 1, 0)  # killed after two records
    before = gc.path.read_text()
    five = replace(SETTINGS, **{"images_per_prompt": 5})
    with pytest.raises(UserError, match=rf"g.jsonl: record '{recs[0].id}' was written with images_per_prompt=3, "
                                        rf"but this run asks for 5"):
        gen_candidates(w, recs, Journal(gc.path), five, 1, 0)
    uc = und_candidates(w, recs[:1], Journal(tmp_path / "u.jsonl"), SETTINGS, 1, 0)
    greedy = replace(SETTINGS, **{"caption_grid": [[1, 0.0]]})
    with pytest.raises(UserError, match=r"was written with caption_grid=\[\[1, 0.0\], \[3, 1.0\]\]"):
        und_candidates(w, recs, Journal(uc.path), greedy, 1, 0)
    assert gc.path.read_text() == before and len(Journal(uc.path)) == 1
    assert len(gen_candidates(w, recs, Journal(gc.path), SETTINGS, 1, 0)) == len(recs)  # the same settings continue


def test_image_folders_never_escape_or_collide():
    assert image_folder("shapes-000123") == "shapes-000123"
    names = [image_folder(i) for i in ("a/../b", "a_.._b", "..", "x y", "x_y", "/etc")]
    assert len(set(names)) == len(names)
    assert all("/" not in n and n not in (".", "..") for n in names)


def test_a_record_without_questions_is_named(wm, tmp_path):
    w, recs = wm
    bad = [CurationRecord("nq", recs[0].prompt, recs[0].image_codes, [], recs[0].truth)]
    gc = gen_candidates(w, bad, Journal(tmp_path / "g.jsonl"), SETTINGS, 1, 0)
    with pytest.raises(ValueError, match="record 'nq' has no questions"):
        gen_scores(w, bad, gc, Journal(tmp_path / "s.jsonl"), SETTINGS, answer_match)


def _row_wise_gen_scores(w, recs, candidates, s):
    """gen_scores' journal lines the unshared way: one generate_text row per (image, question)."""
    tok, cands, out = w.text_tokenizer, candidates.records(), []
    for i in range(0, len(recs), max(1, s.batch_size // 4)):
        batch = recs[i:i + max(1, s.batch_size // 4)]
        rows = [(r, torch.tensor(img), q) for r in batch for img in cands[r.id]["images"] for q in r.questions]
        answers = generate_text(w.model, w.layout, torch.stack([img for _, img, _ in rows]),
                                [und_prompt_ids(tok, q.prompt) for _, _, q in rows], max_new_tokens=s.answer_tokens)
        hits = [int(answer_match(tok.decode(a, skip_special_tokens=True).strip(), q.choices) == q.answer)
                for (_, _, q), a in zip(rows, answers)]
        for r in batch:
            mine = [h for (rr, _, _), h in zip(rows, hits) if rr is r]
            Q = len(r.questions)
            out.append({"id": r.id, "accuracy": [sum(mine[m:m + Q]) / Q for m in range(0, len(mine), Q)]})
    return out


def test_gen_scores_equal_the_row_wise_answers(wm, tmp_path):
    w, recs = wm
    gc = gen_candidates(w, recs, Journal(tmp_path / "g.jsonl"), SETTINGS, 1, 0)
    gs = gen_scores(w, recs, gc, Journal(tmp_path / "s.jsonl"), SETTINGS, answer_match)
    assert [json.loads(x) for x in gs.path.read_text().splitlines()] == _row_wise_gen_scores(w, recs, gc, SETTINGS)


def test_gen_scores_on_the_shipped_base_equal_the_row_wise_answers(tmp_path):
    from hermesflow_fast.selfplay.record_source import world_curation_records
    from hermesflow_fast.world.shipped import load_base

    w = load_base()
    recs = world_curation_records(w, make_records(6, 123, "train"))
    s = CurationSection(images_per_prompt=4, steps=6, answer_tokens=4, batch_size=12)  # 3 records a call
    gc = gen_candidates(w, recs, Journal(tmp_path / "g.jsonl"), s, 1, 0)
    gs = gen_scores(w, recs, gc, Journal(tmp_path / "s.jsonl"), s, answer_match)
    lines = [json.loads(x) for x in gs.path.read_text().splitlines()]
    assert lines == _row_wise_gen_scores(w, recs, gc, s)
    assert [x["id"] for x in lines] == [r.id for r in recs]
    assert len({a for x in lines for a in x["accuracy"]}) > 1  # not a constant: the answers carry information
