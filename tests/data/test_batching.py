"""Batching: per-pair sequences, the first-fit-decreasing packer (numba kernel == plain-Python twin), packed batches
whose per-pair log-probs equal each pair run alone, micro-batches that keep a pair together, and budget errors."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from hermesflow_fast import _notice
from hermesflow_fast.data import batching
from hermesflow_fast.data.batching import (
    TARGET_KEYS,
    TokenizedPair,
    first_fit_decreasing,
    first_fit_decreasing_py,
    micro_batches,
    pack,
    pair_sequences,
    text_budgets,
    tokenize_pair,
)
from hermesflow_fast.data.gen_mask import pair_mask
from hermesflow_fast.model import IGNORE_INDEX, Layout, ModelConfig, UnifiedTransformer, Vocabulary

VOCAB = Vocabulary.build(text_vocab_size=40, eos=3, num_image_codes=16)
LAYOUT = Layout(VOCAB, t2i_text_len=12, mmu_text_len=16)
N = 9  # image tokens


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(g, lo, hi):
    return torch.randint(4, 40, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()


def _pairs(n, seed=0):
    """Random pairs; every third lacks its und side, every fourth its gen side (none lacks both)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        und, gen = i % 3 != 1, i % 4 != 2 or i % 3 == 1
        out.append(TokenizedPair(
            id=f"p{i:02d}", prompt_ids=_ids(g, 1, 8), und_prompt_ids=_ids(g, 2, 5),
            image_codes=torch.randint(0, 16, (N,), generator=g) if und else None,
            caption_chosen_ids=_ids(g, 1, 8) if und else None, caption_rejected_ids=_ids(g, 1, 8) if und else None,
            image_chosen_codes=torch.randint(0, 16, (N,), generator=g) if gen else None,
            image_rejected_codes=torch.randint(0, 16, (N,), generator=g) if gen else None))
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).double().eval()


def _logprob_sums(model, input_ids, mask, position_ids, rows, labels):
    """(P,) Σ_l log softmax(lm_head(h[rows[p, l]]))[labels[p, l]] over labels ≠ −100."""
    h = model(input_ids, mask, position_ids).flatten(0, 1)  # (B·T, d)
    logp = torch.log_softmax(model.lm_head(h[rows]), -1)  # (P, L, V)
    keep = labels != IGNORE_INDEX
    return (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------


def test_pair_sequences_sides_and_shared_mask():
    pairs = _pairs(6)
    s = pair_sequences(LAYOUT, pairs[0], epoch=2, seed=5)
    assert set(s) == {"und", "gen"} and set(pair_sequences(LAYOUT, pairs[1], 2, 5)) == {"gen"}
    assert set(pair_sequences(LAYOUT, pairs[2], 2, 5)) == {"und"}
    gen = s["gen"]
    masked = pair_mask("p00", 2, 5, N)
    k = int(masked.sum())
    for name in ("chosen", "rejected"):
        t = gen.targets[name]
        assert int((t.labels != IGNORE_INDEX).sum()) == k
        assert (gen.input_ids[0, t.rows[0, :k]] == VOCAB.mask).all()
    # same slots in both images: rejected rows are the chosen ones shifted by one image block
    shift = gen.targets["rejected"].rows[0, :k] - gen.targets["chosen"].rows[0, :k]
    assert (shift == N + 2).all()


def test_numba_kernel_equals_python_twin_on_random_inputs():
    if batching._compiled() is None:
        pytest.skip("numba not installed: only the twin runs")
    rng = np.random.default_rng(0)
    for trial in range(300):
        cap = int(rng.integers(1, 200))
        n = int(rng.integers(0, 60))
        lengths = rng.integers(0, cap + 1, n) if trial % 3 else rng.integers(0, 4, n) * (cap // 4)  # many ties
        got = first_fit_decreasing(lengths, cap)
        assert got.dtype == np.int64 and got.tolist() == first_fit_decreasing_py(lengths.tolist(), cap)
        if n:  # a valid packing: no bin over capacity, bins numbered 0..B-1
            fill = np.bincount(got, weights=lengths)
            assert fill.max() <= cap and set(got.tolist()) == set(range(int(got.max()) + 1))


def test_twin_is_first_fit_decreasing():
    # longest first: 8 → bin 0, 7 → bin 1, 5 → bin 2, 3 → bin 1 (first with room 3), 2 → bin 0
    assert first_fit_decreasing_py([3, 8, 5, 2, 7], 10) == [1, 0, 2, 0, 1]
    assert first_fit_decreasing_py([], 5) == []
    with pytest.raises(ValueError, match="item 1 has length 12, outside \\[0, capacity 10\\]"):
        first_fit_decreasing([3, 12], 10)


def test_fallback_without_numba_is_said_once(monkeypatch):
    monkeypatch.setattr(batching, "_kernel", None)
    monkeypatch.setattr(_notice, "_said", set())
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba → ImportError
    with pytest.warns(_notice.FallbackWarning, match="numba is not installed"):
        a = first_fit_decreasing([4, 4, 4], 8)
    assert a.tolist() == [0, 0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert first_fit_decreasing([1], 8).tolist() == [0]


def test_packed_logprobs_equal_each_pair_alone(model):
    """THE property: several pairs per row, per-pair summed log-probs equal the unpacked, one-pair runs."""
    pairs = _pairs(14, seed=1)
    epoch, seed = 1, 10086
    alone = {}
    with torch.no_grad():
        for p in pairs:
            for side, s in pair_sequences(LAYOUT, p, epoch, seed).items():
                for name in ("chosen", "rejected"):
                    t = s.targets[name]
                    alone[(p.id, f"{side}_{name}")] = float(
                        _logprob_sums(model, s.input_ids, s.mask, s.position_ids, t.rows, t.labels)[0])
        batches = micro_batches(pairs, LAYOUT, token_budget=96, epoch=epoch, seed=seed, max_rows=2)
        seen = {}
        for b in batches:
            assert b.input_ids.shape[0] <= 2 and b.input_ids.shape[1] <= 96
            assert int(b.mask.segment.max()) >= 1  # really packed: several sequences in a row
            for key in TARGET_KEYS:
                t = b.targets[key]
                lp = _logprob_sums(model, b.input_ids, b.mask, b.position_ids, t.rows, t.labels)
                have = b.und_pairs if key.startswith("und") else b.gen_pairs
                for i, pid in enumerate(b.pair_ids):
                    if i in have:
                        seen[(pid, key)] = float(lp[i])
                    else:
                        assert (t.labels[i] == IGNORE_INDEX).all()
    assert seen.keys() == alone.keys()
    worst = max(abs(seen[k] - alone[k]) for k in alone)
    assert worst < 1e-9, worst


def test_packed_targets_point_at_the_right_tokens():
    pairs = _pairs(8, seed=2)
    (b,) = micro_batches(pairs, LAYOUT, token_budget=400, epoch=0, seed=0, max_rows=1)
    flat = b.input_ids.flatten()
    for key in ("und_chosen", "gen_chosen", "gen_rejected"):
        t = b.targets[key]
        keep = t.labels != IGNORE_INDEX
        assert int(t.rows.max()) < flat.numel()
        if key.startswith("gen"):
            assert (flat[t.rows[keep]] == VOCAB.mask).all()  # masked slots, scored in place
        else:
            assert torch.equal(flat[t.rows[keep] + 1], t.labels[keep])  # next-token rows (chosen follows prefix)
    assert b.num_tokens == sum(b.row_lengths) and not b.mask.valid[0, sum(b.row_lengths):].any()
    assert b.fill == 1.0  # one row: no row padding, and the sequences' own padding was dropped
    pad_free = sum(int(s.mask.valid.sum()) for p in pairs for s in pair_sequences(LAYOUT, p, 0, 0).values())
    assert b.num_tokens == pad_free


def test_micro_batches_keep_pairs_whole_and_are_order_independent():
    pairs = _pairs(20, seed=3)
    a = micro_batches(pairs, LAYOUT, token_budget=80, epoch=0, seed=0, max_rows=2)
    ids = [pid for b in a for pid in b.pair_ids]
    assert sorted(ids) == sorted(p.id for p in pairs)  # every pair once, both its sides in its batch
    for b in a:
        segs_per_pair = len(b.und_pairs) + len(b.gen_pairs)
        assert segs_per_pair == int((b.mask.segment.amax(1) + 1).sum())
    b = micro_batches(list(reversed(pairs)), LAYOUT, token_budget=80, epoch=0, seed=0, max_rows=2)
    assert [x.pair_ids for x in a] == [x.pair_ids for x in b]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    c = micro_batches(pairs, LAYOUT, token_budget=80, epoch=1, seed=0, max_rows=2)
    assert [x.pair_ids for x in a] != [x.pair_ids for x in c]
    kept = micro_batches(pairs, LAYOUT, token_budget=80, epoch=0, seed=0, max_rows=2, shuffle=False)
    assert [pid for x in kept for pid in x.pair_ids] == [p.id for p in pairs]


def test_budget_errors_name_the_pair_and_lengths():
    pairs = _pairs(3)
    seqs = pair_sequences(LAYOUT, pairs[0], 0, 0)
    n_und = int(seqs["und"].mask.valid.sum())
    with pytest.raises(ValueError, match=rf"pair 'p00': its und sequence has {n_und} tokens, over the token budget "
                                         rf"20 \(its sequences: und {n_und}, gen \d+\)"):
        pack(["p00"], [seqs], token_budget=20)
    with pytest.raises(ValueError, match=r"micro_batches: pair 'p00' has a und sequence of \d+ tokens, over the "
                                         r"token budget 20"):
        micro_batches(pairs, LAYOUT, token_budget=20, epoch=0, seed=0, shuffle=False)
    n_gen = int(seqs["gen"].mask.valid.sum())
    with pytest.raises(ValueError, match=rf"pair 'p00' needs more than max_rows=1 row\(s\) of {max(n_und, n_gen)} "
                                         rf"tokens .*raise token_budget to ≥ {n_und + n_gen}"):
        micro_batches(pairs, LAYOUT, token_budget=max(n_und, n_gen), epoch=0, seed=0, max_rows=1, shuffle=False)
    dup = [pairs[0], pairs[0]]
    with pytest.raises(ValueError, match="pair id 'p00' appears more than once"):
        micro_batches(dup, LAYOUT, token_budget=200, epoch=0, seed=0)


def test_from_records_to_batches(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from hermesflow_fast.data.image_ref import ImageCodes
    from hermesflow_fast.data.pairs import PairRecord
    from hermesflow_fast.data.text import build_word_tokenizer, und_prompt_ids
    from hermesflow_fast.data.validate import validate_pairs

    tok = build_word_tokenizer(["a red square", "a blue circle", "left of"], tmp_path / "tok")
    vocab = Vocabulary.from_tokenizer(tok, num_image_codes=16)
    layout = Layout(vocab, t2i_text_len=12, mmu_text_len=20)
    cache = {f"i{k}": torch.randint(0, 16, (N,)) for k in range(6)}
    recs = [PairRecord("r1", "a red square", "cache:i0", "a red square", "a blue circle", "cache:i1", "cache:i2"),
            PairRecord("r2", "a blue circle left of a red square", "cache:i3", "a blue circle", "a blue circle",
                       "cache:i4", "cache:i5")]
    cap, prompt_cap = text_budgets(layout, len(und_prompt_ids(tok)))
    rep = validate_pairs(recs, "mem", root=tmp_path, text_tokenizer=tok, caption_budget=cap, truncate=False,
                         strict=False, token_cache=cache, prompt_budget=prompt_cap)
    assert rep.summary() == "kept 2 / 2 (und 1, gen 2); sides dropped: 1 equal pair (und)"
    codes = ImageCodes(tmp_path, token_cache=cache)
    tp = [tokenize_pair(r, tok, codes, caption_budget=cap, prompt_budget=prompt_cap) for r in rep.kept]
    assert tp[0].has_und and not tp[1].has_und and tp[1].has_gen
    assert torch.equal(tp[0].image_chosen_codes, cache["i1"])
    (b,) = micro_batches(tp, layout, token_budget=200, epoch=0, seed=0, max_rows=1)
    assert b.und_pairs == [b.pair_ids.index("r1")] and sorted(b.gen_pairs) == [0, 1] and b.truncated == 0
    with pytest.raises(KeyError, match="no image tokenizer was given"):
        codes("imgs/x.png")


def test_several_gen_masks_ride_as_branches_and_equal_each_mask_alone(model):
    """gen_masks = M: one sequence per pair holds M (chosen, rejected) branch pairs behind one prompt; each mask's
    summed log-probs equal the unpacked single-mask row, the targets list the masks in order, tagged by group."""
    pairs = [p for p in _pairs(10, seed=4) if p.has_gen]
    epoch, seed, M = 3, 11, 3
    batches = micro_batches(pairs, LAYOUT, token_budget=160, epoch=epoch, seed=seed, max_rows=2, gen_masks=M)
    assert len(batches) > 1
    seen = 0
    with torch.no_grad():
        for b in batches:
            h = model(b.input_ids, b.mask, b.position_ids).flatten(0, 1)
            for i in b.gen_pairs:
                p = pairs[[q.id for q in pairs].index(b.pair_ids[i])]
                for name in ("chosen", "rejected"):
                    t = b.targets[f"gen_{name}"]
                    keep = t.labels[i] != IGNORE_INDEX
                    group = t.group[i][keep]
                    assert group.tolist() == sorted(group.tolist()) and set(group.tolist()) == set(range(M))
                    lp = torch.log_softmax(model.lm_head(h[t.rows[i][keep]]), -1)
                    lp = lp.gather(-1, t.labels[i][keep].unsqueeze(-1)).squeeze(-1)
                    for m in range(M):
                        masked = pair_mask(p.id, epoch, seed, N, index=m)
                        assert int((group == m).sum()) == int(masked.sum())
                        s = LAYOUT.t2i_pair([p.prompt_ids], p.image_chosen_codes[None], p.image_rejected_codes[None],
                                            masked[None])
                        st = s.targets[name]
                        alone = _logprob_sums(model, s.input_ids, s.mask, s.position_ids, st.rows, st.labels)[0]
                        assert abs(float(lp[group == m].sum()) - float(alone)) < 1e-9
                seen += 1
            assert b.targets["und_chosen"].group is None
    assert seen == len(pairs)
    one = pair_sequences(LAYOUT, pairs[0], epoch, seed)["gen"]
    three = pair_sequences(LAYOUT, pairs[0], epoch, seed, gen_masks=M)["gen"]
    prompt = int(one.mask.valid.sum()) - 2 * (N + 2)
    assert int(three.mask.valid.sum()) == prompt + 2 * M * (N + 2) and int(three.mask.branch.max()) == 2 * M
    with pytest.raises(ValueError, match="gen_masks=3 puts 3 masked copies of each image in it"):
        micro_batches(pairs, LAYOUT, token_budget=60, epoch=0, seed=0, gen_masks=3)
