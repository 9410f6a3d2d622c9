"""Token layout: Show-o's vocabulary, t2i/mmu sequences and omni masks, and the shared-prefix packed pairs (a packed
forward gives the per-token log-probs of the two unpacked sequences)."""

import pytest
import torch

from hermesflow_fast.model import IGNORE_INDEX, Layout, ModelConfig, UnifiedTransformer, Vocabulary

VOCAB = Vocabulary.build(text_vocab_size=40, eos=3, num_image_codes=16)


def test_show_o_vocabulary_matches_the_spec_table():
    v = Vocabulary.show_o()
    assert v.pad == 50295
    assert [v.special[s] for s in ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>",
                                   "<|v2v|>", "<|lvg|>")] == list(range(50296, 50305))
    assert v.image_offset == 50305 and v.mask == 58497 and v.vocab_size == 58498
    assert v.bos == v.eos == 50256
    assert Vocabulary.from_dict(v.to_dict()) == v


def test_vocabulary_from_a_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<|endoftext|>", "a", "red", "square", "blue", "circle"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    v = Vocabulary.from_tokenizer(fast, num_image_codes=8)
    assert v.text_vocab_size == 6 and v.eos == 0 and v.pad == 6
    assert v.soi == fast.convert_tokens_to_ids("<|soi|>") and v.image_offset == len(fast) == 16
    assert v.mask == 24


def _show_o_t2i_mask(ids, pad, soi, eoi):
    """Show-o's create_attention_mask_predict_next, written from Show-o's code (True = may attend)."""
    B, T = ids.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril().repeat(B, 1, 1)
    for b in range(B):
        s, e = (ids[b] == soi).nonzero().item(), (ids[b] == eoi).nonzero().item()
        is_pad = ids[b] == pad
        allowed[b, s:e + 1, :] = True
        last_pad = is_pad.nonzero().max().item() if is_pad.any() else -1
        allowed[b, last_pad + 1:, is_pad] = False
    return allowed


def test_t2i_sequence_layout_labels_and_mask():
    lay = Layout(VOCAB, t2i_text_len=10)
    codes = torch.randint(0, 16, (2, 4))
    masked = torch.tensor([[True, False, True, False], [False, False, False, True]])
    s = lay.t2i([[5, 6, 7], [8] * 20], codes, masked)
    assert s.input_ids.shape == (2, 10 + 1 + 4 + 1) and s.truncated == 1
    row0 = s.input_ids[0].tolist()
    assert row0[:10] == [VOCAB.pad] * 4 + [VOCAB.t2i, VOCAB.bos, 5, 6, 7, VOCAB.eos]
    assert row0[10] == VOCAB.soi and row0[-1] == VOCAB.eoi
    assert row0[11] == VOCAB.mask and row0[12] == codes[0, 1] + VOCAB.image_offset
    assert s.input_ids[1, 9] == VOCAB.eos  # truncated text still ends with eos
    t = s.targets["image"]
    assert t.rows[0].tolist() == [11, 13] and t.labels[0].tolist() == (codes[0, [0, 2]] + VOCAB.image_offset).tolist()
    assert t.labels[1].tolist() == [codes[1, 3] + VOCAB.image_offset, IGNORE_INDEX]
    assert s.position_ids[0].tolist() == list(range(16))  # Show-o: pads take positions
    ref = _show_o_t2i_mask(s.input_ids, VOCAB.pad, VOCAB.soi, VOCAB.eoi)
    dense = s.mask.dense()
    not_pad = s.input_ids != VOCAB.pad
    for b in range(2):  # identical on every real row (pad rows differ and their outputs are never read)
        assert torch.equal(dense[b][not_pad[b]], ref[b][not_pad[b]])


def test_mmu_sequence_is_prefix_lm():
    lay = Layout(VOCAB, mmu_text_len=8)
    codes = torch.randint(0, 16, (1, 4))
    s = lay.mmu(codes, [[10, 11]], [[12, 13, 14]])
    ids = s.input_ids[0].tolist()
    assert ids[:7] == [VOCAB.mmu, VOCAB.soi, *(codes[0] + VOCAB.image_offset).tolist(), VOCAB.eoi]
    assert ids[7:] == [10, 11, 12, 13, 14, VOCAB.eos, VOCAB.pad, VOCAB.pad]
    t = s.targets["answer"]
    assert t.rows[0].tolist() == [8, 9, 10, 11] and t.labels[0].tolist() == [12, 13, 14, VOCAB.eos]
    d = s.mask.dense()[0]
    assert d[:7, :7].all() and not d[:7, 7:].any()  # the image prefix is bidirectional and sees no text
    assert d[7:13, :7].all() and torch.equal(d[7:13, 7:13], torch.ones(6, 6, dtype=torch.bool).tril())
    off = d.clone().fill_diagonal_(False)
    assert not off[:, 13:].any()  # nobody sees the right padding (a pad row sees only itself)


def test_bad_layout_input_is_named():
    lay = Layout(VOCAB)
    with pytest.raises(ValueError, match=r"image codes span \[0, 16\], outside \[0, 16\)"):
        lay.t2i([[5]], torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match=r"text ids \[99\]"):
        lay.t2i([[99]], torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"masked has shape \(1, 3\)"):
        lay.t2i([[5]], torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 texts for 1 image grids"):
        lay.t2i([[5], [6]], torch.zeros(1, 2, dtype=torch.long))


def _token_logps(model, seqs, name):
    h = model(seqs.input_ids, seqs.mask, seqs.position_ids)
    t = seqs.targets[name]
    rows = h.gather(1, t.rows.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    logp = torch.log_softmax(model.lm_head(rows).double(), -1)
    keep = t.labels != IGNORE_INDEX
    return logp.gather(-1, t.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]


@pytest.fixture
def model():
    return UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).eval()


def test_packed_t2i_pair_equals_two_unpacked_sequences(model):
    lay = Layout(VOCAB, t2i_text_len=8)
    B, N = 3, 9
    texts = [[5, 6], [7, 8, 9, 10], [11]]
    cw, cl = torch.randint(0, 16, (B, N)), torch.randint(0, 16, (B, N))
    masked = torch.rand(B, N) < 0.5
    masked[:, 0] = True
    packed = lay.t2i_pair(texts, cw, cl, masked)
    assert packed.input_ids.shape == (B, 8 + 2 * (N + 2))
    with torch.no_grad():
        got_w, got_l = _token_logps(model, packed, "chosen"), _token_logps(model, packed, "rejected")
        ref_w = _token_logps(model, lay.t2i(texts, cw, masked), "image")
        ref_l = _token_logps(model, lay.t2i(texts, cl, masked), "image")
    torch.testing.assert_close(got_w, ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_l, ref_l, atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.targets["chosen"].labels != IGNORE_INDEX, packed.targets["rejected"].labels != -100)


def test_packed_mmu_pair_equals_two_unpacked_sequences(model):
    lay = Layout(VOCAB, mmu_text_len=12)
    codes = torch.randint(0, 16, (2, 6))
    prompts = [[10, 11], [12]]
    chosen = [[20, 21, 22], [23]]
    rejected = [[24], [25, 26, 27, 28]]
    packed = lay.mmu_pair(codes, prompts, chosen, rejected)
    with torch.no_grad():
        got_w, got_l = _token_logps(model, packed, "chosen"), _token_logps(model, packed, "rejected")
        ref_w = _token_logps(model, lay.mmu(codes, prompts, chosen), "answer")
        ref_l = _token_logps(model, lay.mmu(codes, prompts, rejected), "answer")
    torch.testing.assert_close(got_w, ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_l, ref_l, atol=1e-5, rtol=1e-5)
    assert got_w.numel() == 3 + 1 + 1 + 1 and got_l.numel() == 1 + 1 + 4 + 1


def test_packed_branches_never_see_each_other():
    lay = Layout(VOCAB, t2i_text_len=6)
    s = lay.t2i_pair([[5]], torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                     torch.ones(1, 3, dtype=torch.bool))
    d, br = s.mask.dense()[0], s.mask.branch[0]
    assert not d[br == 1][:, br == 2].any() and not d[br == 2][:, br == 1].any()
    assert torch.equal(s.position_ids[0, br == 1], s.position_ids[0, br == 2])
