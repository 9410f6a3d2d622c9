"""Generation: MaskGIT with CFG fills every slot with a valid code, reproducibly; KV-cached text decoding gives
exactly the tokens of full recomputation; batching and prompt padding do not change a row's output; answers with a
shared image prefill equal the per-row ones (tiny model and the shipped base); the per-prompt sampler (inverse CDF)
draws from the same distributions as torch.multinomial (chi-square tests, fixed seeds)."""

import math

import pytest
import torch

from hermesflow_fast.model import Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.model import generate as generate_mod
from hermesflow_fast.model.generate import (
    _inverse_cdf,
    cosine_schedule,
    generate_answers,
    generate_images,
    generate_text,
)

VOCAB = Vocabulary.build(text_vocab_size=30, eos=2, num_image_codes=32)
LAYOUT = Layout(VOCAB, t2i_text_len=8, mmu_text_len=40)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).eval()
    m.reset_parameters(std=0.2)  # peaked logits: samples depend on the input, greedy has no near-ties
    return m.double()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_cosine_schedule_endpoints():
    assert float(cosine_schedule(0.0)) == 1.0 and abs(float(cosine_schedule(1.0))) < 1e-12


def test_maskgit_fills_every_slot_with_a_valid_code(model):
    codes = generate_images(model, LAYOUT, [[5, 6], [7]], num_tokens=9, images_per_prompt=3, steps=6,
                            guidance_scale=2.0, generator=_gen(0))
    assert codes.shape == (6, 9) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < VOCAB.num_image_codes
    again = generate_images(model, LAYOUT, [[5, 6], [7]], num_tokens=9, images_per_prompt=3, steps=6,
                            guidance_scale=2.0, generator=_gen(0))
    assert torch.equal(codes, again)
    other = generate_images(model, LAYOUT, [[5, 6], [7]], num_tokens=9, images_per_prompt=3, steps=6,
                            guidance_scale=2.0, generator=_gen(1))
    assert not torch.equal(codes, other)


@pytest.mark.parametrize("per_prompt", [False, True])
@pytest.mark.parametrize("kw", [{"use_text_cache": False}, {"cfg_batched": False},
                                {"use_text_cache": False, "cfg_batched": False}])
def test_maskgit_fast_paths_equal_the_plain_loop(model, kw, per_prompt):
    args = dict(num_tokens=8, images_per_prompt=2, steps=5, guidance_scale=3.0)
    gen = (lambda: [_gen(3), _gen(4)]) if per_prompt else (lambda: _gen(3))  # noqa: E731
    fast = generate_images(model, LAYOUT, [[5, 6, 7], [9]], generator=gen(), **args)
    slow = generate_images(model, LAYOUT, [[5, 6, 7], [9]], generator=gen(), **args, **kw)
    assert torch.equal(fast, slow)


def test_maskgit_without_guidance_and_single_step(model):
    codes = generate_images(model, LAYOUT, [[5]], num_tokens=4, steps=1, guidance_scale=0.0, generator=_gen(0))
    assert codes.shape == (1, 4) and int(codes.max()) < 32


def test_cached_greedy_decoding_equals_recomputation(model):
    codes = torch.randint(0, 32, (3, 6))
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    cached = generate_text(model, LAYOUT, codes, prompts, max_new_tokens=12)
    full = generate_text(model, LAYOUT, codes, prompts, max_new_tokens=12, use_cache=False)
    assert cached == full
    assert any(len(c) > 0 for c in cached)
    for b in range(3):  # batching with left padding gives each row the tokens it gets alone
        alone = generate_text(model, LAYOUT, codes[b:b + 1], prompts[b:b + 1], max_new_tokens=12)
        assert alone[0] == cached[b]


def test_sampling_is_seeded_and_k_samples_share_a_prefill(model):
    codes = torch.randint(0, 32, (2, 6))
    prompts = [[5, 6], [7]]
    a = generate_text(model, LAYOUT, codes, prompts, max_new_tokens=8, temperature=1.0, top_k=5,
                      num_return_sequences=3, generator=_gen(7))
    b = generate_text(model, LAYOUT, codes, prompts, max_new_tokens=8, temperature=1.0, top_k=5,
                      num_return_sequences=3, generator=_gen(7))
    assert a == b and len(a) == 6
    assert all(0 <= t < VOCAB.text_vocab_size and t != VOCAB.eos for row in a for t in row)
    greedy = generate_text(model, LAYOUT, codes, prompts, max_new_tokens=8, num_return_sequences=2)
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]


def _row_wise(model, layout, codes, prompts, **kw):
    """The unshared way: one generate_text row per (image, prompt), regrouped per image."""
    rows = [b for b, ps in enumerate(prompts) for _ in ps]
    flat = generate_text(model, layout, codes[rows], [p for ps in prompts for p in ps], **kw) if rows else []
    out, k = [], 0
    for ps in prompts:
        out.append(flat[k:k + len(ps)])
        k += len(ps)
    return out


def test_shared_prefill_answers_equal_the_row_wise_ones(model):
    codes = torch.randint(0, 32, (5, 6), generator=_gen(5))
    prompts = [[[5, 6, 7]],  # one question
               [[8], [9, 10, 11, 12, 13, 14, 15], [16, 17], [5], [6, 7, 8, 9], [10, 11, 12]],  # many, varied lengths
               [],  # none
               [[20, 21], [22, 23, 24, 25, 26]],
               [[5, 6, 7]]]  # the same prompt as image 0, another image
    for n in (1, 3, 12):  # most rows reach the limit at 1 and 3
        shared = generate_answers(model, LAYOUT, codes, prompts, max_new_tokens=n)
        assert shared == _row_wise(model, LAYOUT, codes, prompts, max_new_tokens=n)
        assert [len(a) for a in shared] == [1, 6, 0, 2, 1] and all(len(x) <= n for a in shared for x in a)
    assert any(len(x) == 12 for a in shared for x in a) and any(0 < len(x) < 12 for a in shared for x in a)
    no_sot = [[[]], [[5], []], [[6, 7]]]  # without <|sot|> an empty prompt decodes right after [eoi]
    assert generate_answers(model, LAYOUT, codes[:3], no_sot, max_new_tokens=5, sot=False) == _row_wise(
        model, LAYOUT, codes[:3], no_sot, max_new_tokens=5, sot=False)
    assert generate_answers(model, LAYOUT, codes[:2], [[], []]) == [[], []]
    with pytest.raises(ValueError, match="one prompt list per image"):
        generate_answers(model, LAYOUT, codes, prompts[:2])


def test_shared_prefill_sampling_uses_one_generator_per_row(model):
    codes = torch.randint(0, 32, (3, 6), generator=_gen(6))
    prompts = [[[5, 6], [7]], [[8, 9, 10]], [[11], [12, 13], [14, 15, 16, 17]]]
    gens = lambda: [_gen(300 + i) for i in range(6)]  # noqa: E731
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=5)
    shared = generate_answers(model, LAYOUT, codes, prompts, generator=gens(), **kw)
    assert shared == _row_wise(model, LAYOUT, codes, prompts, generator=gens(), **kw)
    assert shared == generate_answers(model, LAYOUT, codes, prompts, generator=gens(), **kw)
    assert shared != generate_answers(model, LAYOUT, codes, prompts, generator=[_gen(400 + i) for i in range(6)],
                                      **kw)
    with pytest.raises(ValueError, match="generators"):
        generate_answers(model, LAYOUT, codes, prompts, generator=gens()[:3], **kw)


@pytest.mark.usefixtures("one_thread")
def test_shared_prefill_answers_on_the_shipped_base():
    """World records' real images and questions on the shipped base: the self-VQA rows exactly as unshared."""
    from hermesflow_fast.data.text import und_prompt_ids
    from hermesflow_fast.selfplay.record_source import world_curation_records
    from hermesflow_fast.world import make_records
    from hermesflow_fast.world.shipped import load_base

    wm = load_base()
    recs = world_curation_records(wm, make_records(12, 7, "train"))
    codes = torch.stack([r.image_codes for r in recs])
    prompts = [[und_prompt_ids(wm.text_tokenizer, q.prompt) for q in r.questions] for r in recs]
    prompts[3] = prompts[3][:1]  # one image with a single question
    for m in (1, 4, 8):
        shared = generate_answers(wm.model, wm.layout, codes, prompts, max_new_tokens=m)
        assert shared == _row_wise(wm.model, wm.layout, codes, prompts, max_new_tokens=m)
    assert sum(len(x) > 0 for a in shared for x in a) > 0.9 * sum(map(len, prompts))  # the base does answer


def test_decoding_stops_at_eos_per_row(model):
    m = UnifiedTransformer(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.lm_head.bias[VOCAB.eos] = 50.0  # eos wins at once
    out = generate_text(m, LAYOUT, torch.zeros(2, 6, dtype=torch.long), [[5], [6, 7]], max_new_tokens=10)
    assert out == [[], []]


def test_per_prompt_generators_make_rows_independent_of_the_batch(model):
    texts = [[5, 6], [7], [8, 9]]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    together = generate_images(model, LAYOUT, texts, num_tokens=8, images_per_prompt=2, steps=4, generator=gens())
    alone = generate_images(model, LAYOUT, texts[1:2], num_tokens=8, images_per_prompt=2, steps=4,
                            generator=gens()[1:2])
    assert torch.equal(together[2:4], alone)
    codes = torch.randint(0, 32, (3, 6))
    txt = generate_text(model, LAYOUT, codes, [[5]] * 3, max_new_tokens=6, temperature=1.0, num_return_sequences=2,
                        generator=gens())
    one = generate_text(model, LAYOUT, codes[2:], [[5]], max_new_tokens=6, temperature=1.0, num_return_sequences=2,
                        generator=gens()[2:])
    assert txt[4:6] == one


def test_per_prompt_rows_do_not_depend_on_the_cpu_chunking(model, monkeypatch):
    texts = [[5, 6], [7], [8, 9, 10]]
    gens = lambda: [torch.Generator().manual_seed(200 + i) for i in range(3)]  # noqa: E731
    args = dict(num_tokens=8, images_per_prompt=3, steps=5, guidance_scale=2.0)
    whole = generate_images(model, LAYOUT, texts, generator=gens(), **args)
    monkeypatch.setattr(generate_mod, "_CPU_CHUNK_TOKENS", 1)  # one image per forward: chunks split prompts
    assert torch.equal(generate_images(model, LAYOUT, texts, generator=gens(), **args), whole)


def _chi2_limit(df: int, z: float = 4.0) -> float:
    """Upper chi-square quantile (Wilson–Hilferty), z standard deviations: z = 4 is p ≈ 3e-5."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs`` (n draws), bins expecting < 5 pooled; (stat, df)."""
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def test_inverse_cdf_draws_the_categorical_distribution():
    logits = torch.tensor([[2.0, 0.5, -1.0, float("-inf"), 0.0, 3.0, -6.0, 1.0],  # a zero-probability code
                           [0.0] * 8,
                           [10.0, -10.0, 0.0, 9.0, -30.0, 8.5, 0.1, -2.0]])  # peaked, with near-zero codes
    n = 100_000
    u = torch.rand(3, n, generator=_gen(11), dtype=torch.float64)
    code, p = _inverse_cdf(logits, u)
    probs = torch.softmax(logits.double(), -1)
    assert code.shape == (3, n) and int(code.min()) >= 0 and int(code.max()) < 8
    assert not bool((code[0] == 3).any())  # never a zero-probability code
    torch.testing.assert_close(p.double(), probs.gather(1, code), rtol=1e-5, atol=0)
    for r in range(3):
        counts = torch.bincount(code[r], minlength=8)
        stat, df = _chi2(counts, probs[r], n)
        assert stat < _chi2_limit(df), (r, stat, df)
        if r != 1:  # an off-by-one sampler would fail this test (row 1 is uniform: any shift fits it)
            assert _chi2(counts.roll(1), probs[r], n)[0] > 10 * _chi2_limit(df)
    one, _ = _inverse_cdf(logits, u[:, :1])  # (n, 1) uniforms: the per-slot draw of a MaskGIT step
    assert torch.equal(one[:, 0], code[:, 0])
    edge, _ = _inverse_cdf(logits, torch.full((3, 1), 1 - 2 ** -53, dtype=torch.float64))  # u → 1: the last code
    assert edge.flatten().tolist() == [7, 7, 7]


def _guided_probs(model, text, N, g):
    """Exact step-1 distribution: softmax((1 + g)·ℓ_cond − g·ℓ_uncond) over the image codes, (N, K)."""
    seqs = LAYOUT.t2i([text, []], torch.zeros(2, N, dtype=torch.long), torch.ones(2, N, dtype=torch.bool))
    L0, K = LAYOUT.t2i_text_len, VOCAB.num_image_codes
    with torch.no_grad():
        lg = model.logits(seqs.input_ids, seqs.mask, seqs.position_ids)[:, L0 + 1:L0 + 1 + N]
    lg = lg[..., VOCAB.image_offset:VOCAB.image_offset + K].double()
    return torch.softmax((1 + g) * lg[0] - g * lg[1], -1)


def test_per_prompt_first_step_samples_the_guided_softmax(model):
    N, M, g = 3, 3000, 1.5
    codes = generate_images(model, LAYOUT, [[5, 6]], num_tokens=N, images_per_prompt=M, steps=1, guidance_scale=g,
                            generator=[_gen(21)])
    probs = _guided_probs(model, [5, 6], N, g)
    for slot in range(N):
        stat, df = _chi2(torch.bincount(codes[:, slot], minlength=VOCAB.num_image_codes), probs[slot], M)
        assert stat < _chi2_limit(df), (slot, stat, df)


def test_per_prompt_sampler_matches_the_multinomial_one_in_distribution(model):
    """Several steps (draws, Gumbel re-masking, guidance): the final codes' per-slot frequencies of the per-prompt
    sampler and of the original one (one generator: torch.multinomial at every slot) agree (homogeneity test)."""
    N, M, K = 3, 1500, VOCAB.num_image_codes
    args = dict(num_tokens=N, images_per_prompt=M, steps=3, guidance_scale=2.0)
    a = generate_images(model, LAYOUT, [[7, 8]], generator=[_gen(31)], **args)
    b = generate_images(model, LAYOUT, [[7, 8]], generator=_gen(32), **args)
    stat, df = 0.0, 0
    for slot in range(N):
        ca, cb = torch.bincount(a[:, slot], minlength=K), torch.bincount(b[:, slot], minlength=K)
        pooled = (ca + cb).double() / (2 * M)
        for c in (ca, cb):  # homogeneity: each sample against the pooled frequencies
            s, d = _chi2(c, pooled, M)
            stat, df = stat + s, df + d
    df //= 2  # the pooled frequencies are estimated: (bins − 1) per slot
    assert stat < _chi2_limit(df), (stat, df)
