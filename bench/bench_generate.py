"""Generation benchmarks: KV-cached caption decoding vs full recomputation, and MaskGIT sampling with CFG in one
batch (text prefix cached) vs the original's two passes.

decode  Show-o's understanding path scaled down to CPU seconds: [mmu][soi] 256 image tokens [eoi] [sot] question,
        then 100 new tokens, greedy (eos suppressed so every caption has exactly 100 tokens), Show-o's vocabulary.
        Default model: d 384, 6 layers, 6 heads (head_dim 64 and partial rotary as Show-o), vocabulary 58,498.
        providers: original (Show-o's mmu_generate: batch 1, the whole sequence and its full-vocabulary logits at
        every position recomputed per token), recompute (our uncached path: the sequence recomputed per token, the
        head on the last position only), kv_cache (batch 1), kv_cache_batched (``--batch`` rows per call; seconds
        per caption = call time / batch).
maskgit t2i sampling at a tiny size: ``--grid``² image tokens, ``--steps`` steps, CFG g = 5, ``--prompts`` prompts ×
        ``--images`` images each. providers: two_pass (cond and uncond as separate forwards, full sequence each
        step: the original), batched_cfg (cond + uncond in one batch), ours (one batch + text prefix cached).

    python -m bench.bench_generate decode                   # → bench/results/generate.csv, bench/plots/generate.png
    python -m bench.bench_generate maskgit --steps 16
    python -m bench.bench_generate decode --d 1024 --layers 12 --device cuda
"""

from __future__ import annotations

import argparse

import torch

from bench import BENCH_DIR
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.model import Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.model.generate import generate_images, generate_text

PANELS = [("caption_decode", "time_per_caption", "seconds per caption (lower is better)"),
          ("maskgit_t2i", "images_per_s", "images / s (higher is better)")]


def _model(vocab: Vocabulary, d: int, layers: int, heads: int, device: str) -> UnifiedTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab.vocab_size, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                      num_attention_heads=heads, max_position_embeddings=2048, attn_backend="sdpa")
    return UnifiedTransformer(cfg).to(device).eval()


@torch.no_grad()
def original_decode(model, layout, codes, prompts, new: int) -> list[list[int]]:
    """Show-o's mmu_generate as the baseline: batch 1, no cache, full logits (T, V) every step, argmax of the last
    row over the text vocabulary (greedy; the same tokens as ours)."""
    v = layout.vocab
    s = layout.mmu(codes.cpu(), prompts, answers=None, sot=True, pad_to=False).to(codes.device)
    ids, mask = s.input_ids, s.mask.dense()
    out = []
    for _ in range(new):
        logits = model.logits(ids, mask)  # (1, T, V): every position, as the original computes it
        tok = logits[:, -1, : v.text_vocab_size].argmax(-1)
        out.append(int(tok))
        if out[-1] == v.eos:
            break
        ids = torch.cat([ids, tok[:, None]], 1)
        T = ids.shape[1]
        grown = torch.zeros(1, T, T, dtype=torch.bool, device=ids.device)
        grown[:, :-1, :-1] = mask
        grown[:, -1] = True  # the new token sees everything before it and itself
        mask = grown
    return [out]


def bench_decode(cfg: argparse.Namespace, rec: hb.Recorder) -> None:
    vocab = Vocabulary.show_o()
    layout = Layout(vocab)
    model = _model(vocab, cfg.d, cfg.layers, cfg.heads, cfg.device)
    with torch.no_grad():
        model.lm_head.bias[vocab.eos] = -1e4  # fixed-length captions: every provider decodes max_new tokens
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, vocab.num_image_codes, (cfg.batch, cfg.prefix), generator=g).to(cfg.device)
    prompts = [list(range(100, 100 + cfg.question)) for _ in range(cfg.batch)]
    runs = {
        "original": (lambda: original_decode(model, layout, codes[:1], prompts[:1], cfg.new), 1),
        "recompute": (lambda: generate_text(model, layout, codes[:1], prompts[:1], cfg.new, use_cache=False), 1),
        "kv_cache": (lambda: generate_text(model, layout, codes[:1], prompts[:1], cfg.new), 1),
        "kv_cache_batched": (lambda: generate_text(model, layout, codes, prompts, cfg.new), cfg.batch),
    }
    ref = runs["recompute"][0]()
    assert runs["kv_cache"][0]() == ref and len(ref[0]) == cfg.new, "cached decoding must equal recomputation"
    assert runs["original"][0]() == ref, "the original's loop must decode the same tokens"
    shape = {"d": cfg.d, "layers": cfg.layers, "heads": cfg.heads, "V": vocab.vocab_size, "prefix_tokens":
             cfg.prefix + 4 + cfg.question, "new_tokens": cfg.new, "batch": cfg.batch, "device": cfg.device}
    for name, (fn, n) in runs.items():
        t = hb.do_bench(fn, warmup=cfg.warmup, rep=cfg.reps, device=cfg.device)
        rec.add(kernel_name="caption_decode", provider=name, metric="time_per_caption", unit="s",
                x_name="rows_per_call", x_value=n, y=tuple(x / n for x in t), config=shape)


def bench_maskgit(cfg: argparse.Namespace, rec: hb.Recorder) -> None:
    vocab = Vocabulary.build(text_vocab_size=1000, eos=0, num_image_codes=cfg.codes)
    layout = Layout(vocab, t2i_text_len=cfg.text_len)
    model = _model(vocab, cfg.d, cfg.layers, cfg.heads, cfg.device)
    texts = [list(range(10 + i, 10 + i + cfg.text_len // 2)) for i in range(cfg.prompts)]
    N = cfg.grid * cfg.grid

    def run(**kw):
        return generate_images(model, layout, texts, N, images_per_prompt=cfg.images, steps=cfg.steps,
                               guidance_scale=5.0, generator=torch.Generator(cfg.device).manual_seed(0), **kw)

    runs = {"two_pass": dict(cfg_batched=False, use_text_cache=False),
            "batched_cfg": dict(cfg_batched=True, use_text_cache=False),
            "ours": dict(cfg_batched=True, use_text_cache=True)}
    n_img = cfg.prompts * cfg.images
    shape = {"d": cfg.d, "layers": cfg.layers, "heads": cfg.heads, "V": vocab.vocab_size, "image_tokens": N,
             "text_len": cfg.text_len, "steps": cfg.steps, "guidance": 5.0, "images": n_img, "device": cfg.device}
    for name, kw in runs.items():
        t = hb.do_bench(lambda kw=kw: run(**kw), warmup=cfg.warmup, rep=cfg.reps, device=cfg.device)
        rec.add(kernel_name="maskgit_t2i", provider=name, metric="images_per_s", unit="1/s", x_name="images",
                x_value=n_img, y=(n_img / t[0], n_img / t[2], n_img / t[1]), config=shape)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("decode", "maskgit", "all"))
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--prefix", type=int, default=256, help="decode: image tokens before the question")
    ap.add_argument("--question", type=int, default=12, help="decode: question tokens")
    ap.add_argument("--new", type=int, default=100, help="decode: new tokens per caption")
    ap.add_argument("--batch", type=int, default=8, help="decode: rows per batched call")
    ap.add_argument("--grid", type=int, default=8, help="maskgit: image grid side (grid² tokens)")
    ap.add_argument("--codes", type=int, default=512, help="maskgit: codebook size")
    ap.add_argument("--text-len", type=int, default=32, help="maskgit: t2i text part length")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--images", type=int, default=4, help="maskgit: images per prompt")
    hb.add_run_args(ap, reps=3, warmup=1)
    hb.add_output_args(ap, "generate", BENCH_DIR)
    ap.add_argument("--plot", default=None, help="PNG of the CSV's newest run per kernel ('' for none; default "
                                                 "bench/plots/generate.png)")
    cfg = ap.parse_args(argv)
    hb.require_device(ap, cfg.device)
    hb.set_threads(cfg.threads)
    rec = hb.Recorder(hb.output_path(cfg, "generate", BENCH_DIR), cfg.device, echo=True)
    if cfg.kind in ("decode", "all"):
        bench_decode(cfg, rec)
    if cfg.kind in ("maskgit", "all"):
        bench_maskgit(cfg, rec)
    print(hb.rows_table(rec.rows))
    rows = rec.done()
    if rec.path and cfg.plot != "":
        png = cfg.plot or hb.plot_path(cfg, "generate", BENCH_DIR)
        print(f"plot: {hb.plot_bars(hb.read_rows(rec.path), png, PANELS)}")
    return rows


if __name__ == "__main__":
    main()
