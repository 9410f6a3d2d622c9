"""GPU tier: the unified model's CUDA paths (FlexAttention / flash with Show-o's masks, bf16 autocast, generation)
agree with the SDPA path. Skipped without CUDA."""

import pytest
import torch

from hermesflow_fast.model import Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.model.attention import flash_available, torch_varlen_available
from hermesflow_fast.model.generate import generate_images, generate_text

pytestmark = pytest.mark.gpu
VOCAB = Vocabulary.build(text_vocab_size=200, eos=2, num_image_codes=64)


def _pair_batch():
    lay = Layout(VOCAB, t2i_text_len=16, mmu_text_len=32)
    g = torch.Generator().manual_seed(0)
    cw, cl = torch.randint(0, 64, (4, 64), generator=g), torch.randint(0, 64, (4, 64), generator=g)
    masked = torch.rand(4, 64, generator=g) < 0.5
    return lay, lay.t2i_pair([[5, 6, 7], [8], [9, 10], [11] * 12], cw, cl, masked).to("cuda")


@pytest.mark.parametrize("backend", ["flex", "varlen", "flash"])
def test_fast_backends_match_sdpa_on_packed_pairs(backend):
    if backend == "flash" and not flash_available():
        pytest.skip("flash-attn is not installed")
    if backend == "varlen" and not torch_varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn")
    torch.manual_seed(0)
    cfg = ModelConfig.tiny(vocab_size=VOCAB.vocab_size, hidden_size=256, num_attention_heads=4)
    model = UnifiedTransformer(cfg).cuda()
    _, s = _pair_batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(s.input_ids, s.mask.dense(), s.position_ids).float()
        model.config.attn_backend = backend
        got = model(s.input_ids, s.mask, s.position_ids).float()
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)
    got.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.layers.parameters())


def test_generation_runs_on_cuda():
    torch.manual_seed(0)
    model = UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).cuda().eval()
    lay = Layout(VOCAB, t2i_text_len=16, mmu_text_len=32)
    codes = generate_images(model, lay, [[5, 6], [7]], num_tokens=16, images_per_prompt=2, steps=4,
                            generator=torch.Generator("cuda").manual_seed(0))
    assert codes.shape == (4, 16) and int(codes.max()) < 64
    full = generate_text(model, lay, codes, [[5]] * 4, max_new_tokens=8, use_cache=False)
    assert generate_text(model, lay, codes, [[5]] * 4, max_new_tokens=8) == full


def test_per_prompt_generation_on_cuda_does_not_depend_on_the_batch():
    """Sharded curation's contract on the GPU: with one generator per prompt (CPU generators, as the stages make them),
    a prompt's images are the same whether it is generated alone or beside others; the shared-prefix answers equal
    one generate_text row per (image, prompt)."""
    from hermesflow_fast.model.generate import generate_answers

    torch.manual_seed(0)
    model = UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).cuda().eval()
    lay = Layout(VOCAB, t2i_text_len=16, mmu_text_len=32)
    texts = [[5, 6], [7], [8, 9, 10]]
    gens = lambda: [torch.Generator().manual_seed(300 + i) for i in range(3)]  # noqa: E731
    args = dict(num_tokens=16, images_per_prompt=2, steps=6, guidance_scale=3.0)
    together = generate_images(model, lay, texts, generator=gens(), **args)
    alone = generate_images(model, lay, texts[2:], generator=gens()[2:], **args)
    assert together.device.type == "cuda" and torch.equal(together[4:6], alone)
    prompts = [[[5], [6, 7]], [[8, 9, 10]], [[11], [12], [13, 14]]]
    shared = generate_answers(model, lay, together[:3], prompts, max_new_tokens=6)
    rows = [(b, p) for b, ps in enumerate(prompts) for p in ps]
    single = generate_text(model, lay, together[[b for b, _ in rows]], [p for _, p in rows], max_new_tokens=6)
    assert [a for per in shared for a in per] == single


def test_sampled_captions_on_cuda_with_cpu_generators():
    """Curation samples captions on a CUDA model with one CPU generator per image: it runs, a row's caption does not
    depend on the batch, and the draws follow the distribution (inverse CDF on the GPU with the CPU's uniforms)."""
    from hermesflow_fast.model.generate import _multinomial

    torch.manual_seed(0)
    model = UnifiedTransformer(ModelConfig.tiny(vocab_size=VOCAB.vocab_size)).cuda().eval()
    lay = Layout(VOCAB, t2i_text_len=16, mmu_text_len=32)
    codes = torch.randint(0, 64, (3, 16), device="cuda")
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(3)]  # noqa: E731
    args = dict(max_new_tokens=8, temperature=1.0, top_k=20)
    together = generate_text(model, lay, codes, [[5]] * 3, generator=gens(), **args)
    alone = generate_text(model, lay, codes[2:], [[5]], generator=gens()[2:], **args)
    assert together[2] == alone[0]
    p = torch.tensor([0.1, 0.0, 0.6, 0.3], device="cuda")
    draws = _multinomial(p.expand(20000, 4), None, [torch.Generator().manual_seed(1)], per_row=20000)
    freq = torch.bincount(draws.cpu(), minlength=4).double() / 20000
    assert freq[1] == 0 and torch.allclose(freq, p.cpu().double(), atol=0.015)


def test_compiled_varlen_blocks_do_not_recompile_across_steps():
    """Per-block torch.compile (inductor) with torch's varlen path: after the warm-up shapes, packed batches of
    other lengths and row counts compile nothing."""
    if not torch_varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn")
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = ModelConfig.tiny(vocab_size=VOCAB.vocab_size, hidden_size=256, num_attention_heads=4)
    model = UnifiedTransformer(cfg).cuda()
    model.config.attn_backend = "varlen"
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(layer)
    lay = Layout(VOCAB, t2i_text_len=16, mmu_text_len=32)
    g = torch.Generator().manual_seed(0)

    def step(texts, n):
        rows = len(texts)
        s = lay.t2i_pair(texts, torch.randint(0, 64, (rows, n), generator=g), torch.randint(0, 64, (rows, n),
                         generator=g), torch.rand(rows, n, generator=g) < 0.5).to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(s.input_ids, s.mask, s.position_ids).float().square().mean().backward()

    torch._dynamo.reset()
    counters.clear()
    for texts, n in (([[5, 6, 7], [8]], 64), ([[5] * 9, [8], [9, 10]], 100), ([[7] * 5], 64)):
        step(texts, n)
    warm = counters["stats"]["unique_graphs"]
    for texts, n in (([[5] * 4, [8] * 6], 36), ([[5], [8] * 3, [9] * 12, [3, 4]], 144), ([[4] * 2], 100)):
        step(texts, n)
    assert counters["stats"]["unique_graphs"] == warm
