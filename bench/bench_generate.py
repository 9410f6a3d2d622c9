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
from pathlib import Path

import torch

from bench import utils
from hermesflow_fast.model import Layout, ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.model.generate import generate_images, generate_text

CSV = utils.RESULTS_DIR / "generate.csv"


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


def bench_decode(cfg, stamps) -> list[dict]:
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
    rows, base = [], None
    shape = {"d": cfg.d, "layers": cfg.layers, "heads": cfg.heads, "V": vocab.vocab_size, "prefix_tokens":
             cfg.prefix + 4 + cfg.question, "new_tokens": cfg.new, "batch": cfg.batch, "device": cfg.device}
    for name, (fn, n) in runs.items():
        t = utils.do_bench(fn, warmup=cfg.warmup, rep=cfg.reps, device=cfg.device)
        per = tuple(x / n for x in t)
        base = base or per[0]
        print(f"decode   {name:<18} {per[0]:8.3f} s/caption   ({base / per[0]:5.2f}× original)")
        rows.append(utils.make_row(kernel_name="caption_decode", provider=name, metric="time_per_caption", unit="s",
                                   x_name="rows_per_call", x_value=n, y=per, config=shape, device=cfg.device,
                                   dtype="fp32", stamps=stamps))
    return rows


def bench_maskgit(cfg, stamps) -> list[dict]:
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
    rows, base = [], None
    n_img = cfg.prompts * cfg.images
    shape = {"d": cfg.d, "layers": cfg.layers, "heads": cfg.heads, "V": vocab.vocab_size, "image_tokens": N,
             "text_len": cfg.text_len, "steps": cfg.steps, "guidance": 5.0, "images": n_img, "device": cfg.device}
    for name, kw in runs.items():
        t = utils.do_bench(lambda kw=kw: run(**kw), warmup=cfg.warmup, rep=cfg.reps, device=cfg.device)
        ips = tuple(n_img / x for x in t)
        base = base or ips[0]
        print(f"maskgit  {name:<18} {ips[0]:8.2f} images/s   ({ips[0] / base:5.2f}× two_pass)")
        rows.append(utils.make_row(kernel_name="maskgit_t2i", provider=name, metric="images_per_s", unit="1/s",
                                   x_name="images", x_value=n_img, y=ips, config=shape, device=cfg.device,
                                   dtype="fp32", stamps=stamps))
    return rows


def plot(csv: Path, out: Path) -> Path:
    """Bars of the newest run per kernel: seconds per caption, images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = utils.read_rows(csv)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kernel, label in ((axes[0], "caption_decode", "seconds per caption (lower is better)"),
                              (axes[1], "maskgit_t2i", "images / s (higher is better)")):
        rs = [r for r in rows if r["kernel_name"] == kernel]
        if not rs:
            ax.set_visible(False)
            continue
        newest = max(r["timestamp"] for r in rs)
        rs = [r for r in rs if r["timestamp"][:13] == newest[:13]]  # the newest run (same hour)
        names = [r["kernel_provider"] for r in rs]
        vals = [float(r["y_value_50"]) for r in rs]
        ax.bar(names, vals, color=["#999999", "#4c72b0", "#55a868"][: len(vals)])
        ax.set_title(f"{kernel} ({rs[0]['device_name']}, {rs[0]['commit']})", fontsize=9)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


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
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(CSV), help="CSV to append to ('' for none)")
    ap.add_argument("--plot", default=str(utils.ROOT / "bench" / "plots" / "generate.png"), help="PNG ('' for none)")
    cfg = ap.parse_args(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    utils.set_threads(cfg.threads)
    stamps = utils.run_stamps(cfg.device)
    rows = []
    if cfg.kind in ("decode", "all"):
        rows += bench_decode(cfg, stamps)
    if cfg.kind in ("maskgit", "all"):
        rows += bench_maskgit(cfg, stamps)
    if cfg.out:
        print(f"appended {len(rows)} rows to {utils.append_rows(cfg.out, rows)}")
        if cfg.plot:
            print(f"plot: {plot(Path(cfg.out), Path(cfg.plot))}")
    return rows


if __name__ == "__main__":
    main()
