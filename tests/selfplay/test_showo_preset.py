"""The Show-o recipes run HermesFlow's own settings (docs/differences.md, "The Show-o preset"): each row of that table
has a test here that the preset does what the row says, or that the deliberate difference is what the code does."""

from __future__ import annotations

import math

import pytest
import torch

from hermesflow_fast.config import load_config
from hermesflow_fast.data.text import und_prompt_ids
from hermesflow_fast.model import IGNORE_INDEX, Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.model.generate import generate_images, generate_text, noise_schedule, scheduled_masks
from hermesflow_fast.selfplay.config import CurationSection, SelfPlayConfig
from hermesflow_fast.selfplay.stages import reencode, vqa_question
from hermesflow_fast.train.config import TrainConfig

PAPER_GRID = [[1, 0.0]] + [[k, t] for k in (2, 3, 4) for t in (0.1, 0.7, 2.0)]


@pytest.fixture(scope="module")
def real():
    return load_config("selfplay-real", schema=SelfPlayConfig)


def test_selfplay_real_recipe_is_the_originals_curation(real):
    c, d = real.curation, real.data
    assert c.caption_grid == PAPER_GRID and c.caption_tokens == 100
    assert (c.images_per_prompt, c.steps, c.guidance_scale, c.noise_temperature) == (16, 50, 5.0, 1.0)
    assert (c.answer_tokens, c.vqa_prompt, c.reencode_images, c.vqa_threshold) == (100, "hermesflow", True, 0.6)
    assert c.caption_question == "\nGive a caption for this image."
    assert (d.scorer_kind, d.answer_kind, d.answer_min_similarity) == ("bert-cls", "sbert", -1.0)
    # the one deliberate sampler difference: τ₀(1 − r), not compounded; the knob restores the original's
    assert c.compounding_noise is False


@pytest.mark.parametrize("recipe,schema", [("selfplay-real", SelfPlayConfig), ("show-o-512", TrainConfig)])
def test_pair_dpo_recipes_train_with_the_originals_settings(recipe, schema):
    t = load_config(recipe, schema=schema).train
    assert (t.beta, t.lr, t.text_dropout, t.max_grad_norm) == (0.2, 2e-5, 0.1, None)
    assert (t.weight_decay, t.adam_betas, t.adam_eps, t.loss_type) == (0.01, [0.9, 0.999], 1e-8, "sigmoid")


class _Spy:
    """A tokenizer that records the text it is asked to tokenize."""

    def __init__(self):
        self.texts = []

    def __call__(self, text, add_special_tokens=False):
        self.texts.append(text)
        return {"input_ids": [0]}


def test_caption_and_vqa_prompts_are_the_originals_text(real):
    spy = _Spy()
    und_prompt_ids(spy, real.curation.caption_question)
    assert spy.texts[-1] == "USER: \nGive a caption for this image. ASSISTANT:"  # inference_mmu_caption.py

    from hermesflow_fast.selfplay.tifa import RealQuestion

    Q = RealQuestion("q1", "r1", "object", "is there a dog?", ("yes", "no"), "yes")

    und_prompt_ids(spy, vqa_question(Q, real.curation.vqa_prompt))
    assert spy.texts[-1] == "USER: \nQuestion:is there a dog? Choice:['yes', 'no'] ASSISTANT:"  # inference_mmu_vqa.py
    und_prompt_ids(spy, vqa_question(Q, CurationSection().vqa_prompt))
    assert spy.texts[-1] == "USER: is there a dog? choices: yes, no ASSISTANT:"


def test_self_vqa_reads_the_images_decoded_and_encoded_again():
    from hermesflow_fast.model.tokenizer_vq import PatchVQConfig, PatchVQTokenizer, images_to_uint8

    torch.manual_seed(0)
    vq = PatchVQTokenizer(PatchVQConfig(patch_size=4, num_codes=32, image_size=16))
    codes = torch.randint(0, 32, (3, 16))
    again = reencode(vq, codes)
    px = images_to_uint8(vq.decode(codes)).permute(0, 3, 1, 2).float()
    assert torch.equal(again, vq.encode((px / 255.0 - 0.5) / 0.5))
    assert again.shape == codes.shape and again.dtype == torch.long


def test_mask_count_is_shows_float32_arithmetic():
    for n, steps in ((256, 12), (256, 18), (1024, 50), (1024, 12), (16, 16)):
        for s in range(steps):
            ratio = torch.tensor(1.0 * (s + 1) / steps)  # float32, as Show-o's t2i_generate
            assert scheduled_masks(n, s, steps) == int((n * torch.cos(ratio * math.pi * 0.5)).floor())
    # where float32 and float64 part: step 7 of 12 at 256 tokens keeps 127 masked, not 128
    assert scheduled_masks(256, 7, 12) == 127 and math.floor(256 * math.cos(math.pi / 2 * 8 / 12)) == 128


VOCAB = Vocabulary.build(text_vocab_size=30, eos=2, num_image_codes=32)
LAYOUT = Layout(VOCAB, t2i_text_len=10, mmu_text_len=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).eval()


def test_compounding_noise_knob_restores_shows_temperature_schedule(model, monkeypatch):
    """τ_s = τ₀(1 − r_s) by default; ``compounding_noise`` gives Show-o's τ ← τ(1 − r_s) at every step, and the
    curation knob reaches the sampler."""
    t0, steps = 2.0, 4
    comp, tau = [], t0
    for s in range(steps):  # Show-o's t2i_generate: temperature = temperature * (1.0 - ratio), every step
        tau = tau * (1.0 - 1.0 * (s + 1) / steps)
        comp.append(tau)
    assert noise_schedule(t0, steps, compounding=True) == comp
    assert noise_schedule(t0, steps) == [t0 * (1 - (s + 1) / steps) for s in range(steps)] != comp

    import hermesflow_fast.model.generate as gen
    import hermesflow_fast.selfplay.stages as stages

    asked = []
    monkeypatch.setattr(gen, "noise_schedule", lambda t, n, c=False: asked.append(c) or [0.0] * n)
    for compounding in (False, True):
        generate_images(model, LAYOUT, [[5, 6]], 9, steps=3, guidance_scale=0.0, compounding_noise=compounding,
                        generator=torch.Generator().manual_seed(0))
        generate_images(model, LAYOUT, [[5, 6]], 9, steps=3, guidance_scale=0.0, compounding_noise=compounding,
                        generator=[torch.Generator().manual_seed(0)])
    assert asked == [False, False, True, True]
    seen = {}
    monkeypatch.setattr(stages, "generate_images", lambda *a, **kw: seen.update(kw) or torch.zeros(2, 9, dtype=int))
    rec = stages.CurationRecord("r", "p", torch.zeros(9, dtype=torch.long), [])
    wm = type("WM", (), {"text_tokenizer": _Spy(), "model": model, "layout": LAYOUT})()
    stages.gen_candidates(wm, [rec], _Journal(), CurationSection(images_per_prompt=2, compounding_noise=True), 1, 0)
    assert seen["compounding_noise"] is True


class _Journal(list):
    path = "memory"

    def __contains__(self, key):
        return False

    def append(self, rec):
        super().append(rec)


def test_deliberate_generation_logp_leaves_out_soi_and_eoi():
    """The original also scores [soi] and [eoi] predicting themselves (near-trivial identity terms); ours scores the
    masked image slots only."""
    codes = torch.randint(0, 32, (1, 9))
    masked = torch.zeros(1, 9, dtype=torch.bool)
    masked[0, [1, 4, 7]] = True
    seqs = LAYOUT.t2i_pair([[5, 6]], codes, torch.randint(0, 32, (1, 9)), masked)
    for name in ("chosen", "rejected"):
        t = seqs.targets[name]
        labels = t.labels[0][t.labels[0] != IGNORE_INDEX]
        assert labels.numel() == 3
        ids = seqs.input_ids.flatten()[t.rows[0][t.labels[0] != IGNORE_INDEX]]
        assert (ids == VOCAB.mask).all() and VOCAB.soi not in labels.tolist() and VOCAB.eoi not in labels.tolist()


def test_deliberate_text_decoding_emits_text_tokens_only(model):
    """The original samples captions over every id (image codes and specials included); ours over the text
    vocabulary: even a head that prefers an image code never emits one."""
    m = UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).eval()
    with torch.no_grad():
        m.lm_head.bias.zero_()
        m.lm_head.bias[VOCAB.image_offset + 3] = 50.0  # an image code dominates every position
    out = generate_text(m, LAYOUT, torch.randint(0, 32, (2, 9)), [[5, 6], [7]], max_new_tokens=6, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert all(0 <= t < VOCAB.text_vocab_size for row in out for t in row)


def test_bert_cls_scorer_truncates_where_the_model_does(bert_dir):
    """The original embeds captions with BERT-large up to its 512 positions; so do we (the model's own limit), not at
    128 tokens."""
    from hermesflow_fast.selfplay.scorers import TextEmbedder

    emb = TextEmbedder(bert_dir, "bert-cls")
    assert emb.max_length == 64  # the tiny test BERT's max_position_embeddings; bert-large-uncased's is 512
    head = " ".join(["a red circle"] * 15)  # 45 words
    a, b = emb.embed([head + " above the blue square", head + " below the green triangle"])
    assert not torch.allclose(a, b)  # words past token 40 still count
