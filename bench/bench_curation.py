"""Records per second of one full curation pass (K captions + M images + self-VQA per record) on the shipped
shapes-world base model: ours (the self-play stages: batched over records, KV-cached decoding, cond + uncond in one
batch with the text prefix cached, token grids straight into self-VQA) against a HermesFlow-style pass
(bench/hermesflow_curation.py: batch 1, no KV cache, full logits every step, PNG round trip before self-VQA) on the
same model, records and sampling settings, in one run.

    python -m bench.bench_curation                      # CPU: 32 records, the paper's 10-caption grid, M = 8
    python -m bench.bench_curation --records 8 --images 4 --out /tmp/c.csv
    python -m bench.bench_curation --device cuda --dtype bf16 --preset show_o_512 --records 4 --images 8

``--preset show_o_512`` keeps the world (records, questions, word tokenizer, sampling settings) and swaps the model
for Show-o-512's shape with random weights: a 2048-wide, 24-layer, 32-head transformer over 8,192 image codes on a
32×32 grid (1,024 image tokens; records rendered at 128 px and encoded by a random 4×4-patch VQ). Random weights
never stop a text early, so every caption and answer runs to its token budget on both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench import BENCH_DIR
from bench.hermesflow_curation import hermesflow_curation_pass
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.config import load_config
from hermesflow_fast.model.bundle import ModelBundle
from hermesflow_fast.model.config import ModelConfig
from hermesflow_fast.model.layout import Layout
from hermesflow_fast.model.tokenizer_vq import PatchVQConfig, PatchVQTokenizer
from hermesflow_fast.model.transformer import UnifiedTransformer
from hermesflow_fast.selfplay.config import CurationSection, SelfPlayConfig
from hermesflow_fast.selfplay.journal import Journal
from hermesflow_fast.selfplay.record_source import world_curation_records
from hermesflow_fast.selfplay.stages import CurationRecord, gen_candidates, gen_scores, und_candidates
from hermesflow_fast.world import make_records
from hermesflow_fast.world.scoring import answer_match
from hermesflow_fast.world.shipped import load_base

# model and image-grid sizes; "tiny" is for tests
PRESETS = {
    "show_o_512": dict(d=2048, layers=24, heads=32, grid=32, codes=8192),
    "tiny": dict(d=64, layers=2, heads=4, grid=16, codes=512),
}
PATCH = 4


def preset_world(wm: ModelBundle, d: int, layers: int, heads: int, grid: int, codes: int, seed: int = 0) -> ModelBundle:
    """The world's vocabulary and tokenizer around a random ``d``-wide, ``layers``-deep model over ``codes`` image
    codes on a ``grid``×``grid`` grid (a random patch VQ over (PATCH·grid)-pixel images)."""
    g = torch.Generator().manual_seed(seed)
    vq_cfg = PatchVQConfig(image_size=PATCH * grid, patch_size=PATCH, num_codes=codes)
    vq = PatchVQTokenizer(vq_cfg, torch.rand(codes, vq_cfg.dim, generator=g) * 2 - 1)
    vocab = dataclasses.replace(wm.vocab, num_image_codes=codes)
    layout = Layout(vocab, t2i_text_len=wm.layout.t2i_text_len, mmu_text_len=wm.layout.mmu_text_len)
    longest = max(layout.t2i_text_len, layout.mmu_text_len) + grid * grid + 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UnifiedTransformer(ModelConfig(vocab_size=vocab.vocab_size, hidden_size=d, intermediate_size=4 * d,
                                               num_hidden_layers=layers, num_attention_heads=heads,
                                               max_position_embeddings=1 << (longest - 1).bit_length()))
    return ModelBundle(model.eval(), vocab, layout, wm.text_tokenizer, vq)


def curation_records(wm: ModelBundle, records) -> list[CurationRecord]:
    """World records → curation records, each image rendered at the image tokenizer's size and encoded once."""
    size = wm.image_tokenizer.image_size[0]
    imgs = torch.stack([torch.from_numpy(r.render(size)).permute(2, 0, 1).float() / 127.5 - 1 for r in records])
    codes = wm.image_tokenizer.encode(imgs.to(wm.image_tokenizer.device)).cpu()
    return [CurationRecord(r.id, r.prompt, c, list(r.questions), r.scene) for r, c in zip(records, codes)]


def sampling_settings(cfg: argparse.Namespace) -> CurationSection:
    """The curation knobs of the pass: with ``--preset show_o_512`` the original's (the ``selfplay-real`` recipe:
    16 images, 50 steps, CFG 5, 100-token captions and answers, its prompts, self-VQA on re-encoded images), else the
    schema's defaults; ``--images`` / ``--steps`` / ``--batch`` / ``--captions two`` override them."""
    base = (load_config("selfplay-real", schema=SelfPlayConfig).curation if cfg.preset == "show_o_512"
            else CurationSection())
    given = {"images_per_prompt": cfg.images, "steps": cfg.steps, "batch_size": cfg.batch}
    over = {k: v for k, v in given.items() if v is not None}
    if cfg.captions == "two":
        over["caption_grid"] = [[1, 0.0], [3, 0.7]]
    return dataclasses.replace(base, **over)


def ours_pass(wm, records, settings, tmp, stages: dict[str, float] | None = None) -> None:
    """The three curation stages as a round runs them; ``stages`` receives each one's seconds (the names of the
    baseline's: captions, images, self_vqa)."""
    stages = {} if stages is None else stages
    with hb.stage_timer(stages, "captions", wm.device):
        und_candidates(wm, records, Journal(tmp / "u.jsonl"), settings, 1, 0)
    with hb.stage_timer(stages, "images", wm.device):
        gc = gen_candidates(wm, records, Journal(tmp / "g.jsonl"), settings, 1, 0)
    with hb.stage_timer(stages, "self_vqa", wm.device):
        gen_scores(wm, records, gc, Journal(tmp / "s.jsonl"), settings, answer_match)


def main(argv: list[str] | None = None) -> list[dict]:
    import tempfile
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m bench.bench_curation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="world model folder (default: the shipped base)")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--images", type=int, default=None,
                    help="images per prompt (M)  [default: curation.images_per_prompt of the sampling settings]")
    ap.add_argument("--steps", type=int, default=None, help="MaskGIT steps  [default: curation.steps, as --images]")
    ap.add_argument("--captions", choices=("paper", "two"), default="paper", help="the 10-caption grid or 2")
    ap.add_argument("--batch", type=int, default=None, help="ours: records per generation call  [default: "
                                                            "curation.batch_size]")
    hb.add_run_args(ap, reps=None, warmup=None, devices=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, choices=(0, 1), default=1, help="one untimed pass of each on one record")
    ap.add_argument("--profile", default=None, choices=("ours", "hermesflow"),
                    help="print the top ops of one pass of this side under torch.profiler instead of timing")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's weights")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a random model of this size instead of the base (see the module docstring)")
    ap.add_argument("--baseline-cfg", choices=("batched", "separate"), default="batched",
                    help="the baseline's cond and uncond rows: one forward per step (the original's t2i_generate) "
                         "or two")
    hb.add_output_args(ap, "curation", BENCH_DIR)
    cfg = ap.parse_args(argv)
    hb.require_device(ap, cfg.device)
    batched = cfg.baseline_cfg == "batched"
    threads = hb.set_threads(cfg.threads)
    wm = load_base(cfg.base)
    if cfg.preset:
        wm = preset_world(wm, **PRESETS[cfg.preset])
    wm.to(cfg.device)
    wm.model.to(hb.DTYPES[cfg.dtype])
    world = make_records(cfg.records, 123, "train")
    recs = curation_records(wm, world) if cfg.preset else world_curation_records(wm, world)
    s = sampling_settings(cfg)
    grid = s.caption_grid
    rec = hb.Recorder(hb.output_path(cfg, "curation", BENCH_DIR), cfg.device, kernel_name="curation_pass",
                      metric="records_per_s", unit="1/s", x_name="records", dtype=cfg.dtype)
    shape = {"records": cfg.records, "captions": len(grid), "images_per_prompt": s.images_per_prompt, "steps": s.steps,
             "questions": sum(len(r.questions) for r in recs), "image_tokens": int(recs[0].image_codes.numel()),
             "params": sum(p.numel() for p in wm.model.parameters()), "threads": threads, "device": cfg.device,
             "warmup": cfg.warmup, "preset": cfg.preset or "base", "d": wm.model.config.hidden_size,
             "layers": wm.model.config.num_hidden_layers, "baseline_cfg": cfg.baseline_cfg}
    if cfg.warmup:  # first-call costs (CUDA context, cuBLAS handles, compiled attention kernels) off the clock
        with tempfile.TemporaryDirectory() as tmp:
            ours_pass(wm, recs[:1], s, Path(tmp))
            hermesflow_curation_pass(wm, recs[:1], s, answer_match, cfg_batched=batched)
    if cfg.profile:
        with tempfile.TemporaryDirectory() as tmp:
            run = (lambda: ours_pass(wm, recs, s, Path(tmp))) if cfg.profile == "ours" else (
                lambda: hermesflow_curation_pass(wm, recs, s, answer_match, cfg_batched=batched))
            print(hb.profile_table(run, cfg.device))
        return []
    for name in ("hermesflow", "ours"):
        with tempfile.TemporaryDirectory() as tmp:
            hb.sync(cfg.device)
            stages: dict[str, float] = {}
            t0 = time.perf_counter()
            if name == "ours":
                ours_pass(wm, recs, s, Path(tmp), stages)
            else:
                hermesflow_curation_pass(wm, recs, s, answer_match, stages=stages, cfg_batched=batched)
            hb.sync(cfg.device)
            dt = time.perf_counter() - t0
        print(f"curation {name:<11} {dt:8.1f} s  [{', '.join(f'{k} {v:.1f} s' for k, v in stages.items())}]")
        rec.add(provider=name, x_value=cfg.records, y=(cfg.records / dt,),
                config={**shape, "stage_seconds": {k: round(v, 3) for k, v in stages.items()}})
    print(hb.rows_table(rec.rows, baseline="hermesflow"))
    return rec.done()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
