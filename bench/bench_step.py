"""One Pair-DPO training step, pairs/s and peak memory: ours vs a faithful HermesFlow-style step, same model, pairs and
hardware, in one run, with the levers added one at a time.

A step = the frozen reference's forward + the policy's forward and backward + gradient clipping + an AdamW step, for
``--pairs`` B homologous pairs (each has both sides: a caption pair on a real image, an image pair for a prompt).

Providers (rows), each lever on top of the previous one:
    hermesflow     bench/hermesflow_step.py: every image (win, lose, real) re-encoded by MAGVIT-v2 every step,
                   unpacked padded t2i + mmu rows per win/lose (Layout.t2i / Layout.mmu, T = 387 at 256 px), dense
                   float additive masks (2B, 1, T, T), four forwards (policy win/lose, reference win/lose), full
                   (2B, T, V) logits → full-vocabulary log_softmax → gather, per-pair sums, ops.reference.pair_dpo_loss
    +token_cache   the same without the per-step encode (the pairs' codes precomputed once: `hermesflow tokenize`)
    +packing       Trainer.train_step with our packed micro-batches (shared-prefix pair layouts, pad-free first-fit
                   rows of ≤ --token-budget tokens, one forward per model per micro-batch, the OmniMask on the
                   attention backend "auto" picks: SDPA with a dense boolean mask on CPU, flash-attention varlen or
                   FlexAttention on CUDA) but the naive head: full logits of every packed position, full log_softmax,
                   gather at the target rows (NaiveHeadObjective, bench/step_world.py)
    +fused_head    = ours: Trainer.train_step as users run it (PairDPOObjective: the fused head on target rows only)
    +compile       ours with model.compile=true (torch.compile of every block); on by default on CUDA, off on CPU
                   (Inductor takes minutes on 2 cores; --compile forces it)
Ours is built by ``make_trainer`` (bench/step_world.py): Trainer.setup's steps without the run folder and the
file-based data loading (models, data, optimizer, scheduler, speed options set as setup sets them); the timed call is
``Trainer.train_step``.

Before timing, a check (in fp32, whatever --dtype) builds one batch and asserts that the HermesFlow-style step, the
+packing objective and ours give the same loss (relative 1e-4), the same mean policy log-probs and reward margins
per side, and that re-encoding the pixels gives the cached codes.

Shapes. Show-o's token layout at 256 px (N = 256 image tokens, t2i text 129, mmu text 128, T = 387), Show-o's vocabulary
(50,295 text + 10 special + 8,192 codes + [MASK] = 58,498). Pairs: random prompt (20–60 tokens), a 13-token question,
captions of 30–90 tokens, random pixels (B, 3, 256, 256) whose codes the same encoder gives. The policy starts as the
reference plus 0.01·N(0, 1) on every weight, so margins are not 0. CPU default ("tiny-to-small"): d 384, 6 layers,
6 heads (head_dim 64, partial rotary 32), MLP 4d, B = 4, fp32, and a MAGVIT-v2 of Show-o's architecture scaled to the
backbone: ch 24 (Show-o: 128; multipliers (1, 2, 2, 4, 4), res-blocks (4, 3, 4, 3, 4), 13 LFQ bits), GroupNorm 8
groups, so the encoder's share of the step's FLOPs is near Show-o's (ch ≈ 128·√(P_small / P_Show-o) rounded to a
multiple of 8; P = matmul parameters with the head). ``--preset show_o_512``: d 2048, 24 layers, 32 heads, the full
MAGVIT-v2 (ch 128, 32 groups). Token budget (data.token_budget of ours): 8192 on CUDA, as the Show-o-512 recipe; 1024
on CPU, about one pair (its gen and und sequences, ~950 tokens) per row. CPU attention is SDPA split per packed
sequence and branch (model/attention.py), so a row's attention costs the sum of its sequences' squares, not the row's
square; 1024 was still a little faster than 4096 here (12.3 s vs 12.7 s per step: smaller head chunks stay in cache).

Metrics per provider: pairs_per_s (B / step time; q20/q80 of the timed steps), memory_extra (MB: peak during a timed
step above the memory held between steps: weights, reference, AdamW state), and on CUDA mfu: model FLOPs
(3·2·P_body·T_policy + 3·2·P_head·R_policy + 2·P_body·T_ref + 2·P_head·R_ref, P_body = block matmul parameters, P_head
= the LM head's, T = tokens through the backbone, R = rows through the head: every token for the full-logits rows, the
target rows for the fused head; attention and the encoder not counted: ModelConfig.forward_flops) / step time / the
card's bf16 peak (989 TFLOP/s on H100). On CPU each provider runs in two fresh processes: one times the steps under
glibc's default allocator, the other measures one step's peak RSS (MALLOC_MMAP_THRESHOLD_=65536, VmHWM reset before the
step, as the op benchmarks do; that setting makes every large allocation fault its pages in afresh and slows every path,
so it is not where time is taken: the rows keep that process's step time too, as step_time_s_rss_process); on CUDA in
this process (torch.cuda.max_memory_allocated).

    python -m bench.bench_step                       # CPU default → bench/results/step.csv, bench/plots/step.png
    python -m bench.bench_step --profile hermesflow,+fused_head --out ''      # where the time goes, one step each
    python -m bench.bench_step --d 64 --layers 1 --heads 2 --text-vocab 300 --code-bits 6 --image-size 64 \\
        --text-len 24 --vq-ch 8 --pairs 2 --reps 1 --warmup 0 --inprocess --out /tmp/step.csv   # toy size
    python -m bench.bench_step --device cuda --dtype bf16 --preset show_o_512 --pairs 8 --out /tmp/step_gpu.csv
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict
from pathlib import Path

import torch

from bench import BENCH_DIR
from bench.step_world import (  # Problem, build_world: also used as bench_step.Problem / .build_world
    PRESETS,
    Problem,
    World,
    build_world,
    exact_fp32,
    make_hermesflow,
    make_runner,
    make_trainer,
    scaled_vq_ch,
)
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.data.batching import micro_batches
from hermesflow_fast.model import ModelConfig
from hermesflow_fast.model.layout import IGNORE_INDEX
from hermesflow_fast.train.objective import SIDES
from hermesflow_fast.train.trainer import _peak_flops

KERNEL = "pair_dpo_step"
PROVIDERS = ("hermesflow", "+token_cache", "+packing", "+fused_head", "+compile")
OURS = "+fused_head"
CHECK_RTOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs (for MFU) of one step
# ---------------------------------------------------------------------------------------------------------------------


def step_work(w: World, provider: str, epoch: int) -> dict:
    """Tokens through the backbone and rows through the head, per model, of the step at ``epoch``."""
    p = w.p
    if provider in ("hermesflow", "+token_cache"):
        t = 2 * (2 * p.pairs * p.row_len)  # win + lose batches of 2B rows
        return {"tokens": t, "head_rows": t, "tokens_valid": t}
    mbs = micro_batches(w.pairs, w.layout, p.token_budget, epoch, p.seed)
    tokens = sum(mb.input_ids.numel() for mb in mbs)
    valid = sum(mb.num_tokens for mb in mbs)
    targets = sum(int((t.labels != IGNORE_INDEX).sum()) for mb in mbs for t in mb.targets.values())
    return {"tokens": tokens, "head_rows": tokens if provider == "+packing" else targets, "tokens_valid": valid,
            "micro_batches": len(mbs)}


def model_flops(config: ModelConfig, work: dict) -> float:
    """Model FLOPs of one step: the policy's forward + backward (3 forwards) and the reference's forward."""
    return 4.0 * config.forward_flops(work["tokens"], work["head_rows"])


# ---------------------------------------------------------------------------------------------------------------------
# the check: same loss on the same batch
# ---------------------------------------------------------------------------------------------------------------------


def check_losses(p: Problem, rtol: float = CHECK_RTOL, world: World | None = None) -> dict[str, float]:
    """HermesFlow-style loss vs +packing vs ours (Trainer.train_step's reported loss) at step 0, in fp32; also the
    per-side mean policy log-probs and reward margins, and the re-encoded codes. AssertionError with the numbers."""
    w = world or build_world(p)  # the models hold fp32 weights whatever --dtype; the check runs without autocast
    with exact_fp32(p.device):
        saved = {k: v.detach().to("cpu", copy=True) for k, v in w.policy.state_dict().items()}  # restored after
        hf = make_hermesflow(w, "hermesflow", dtype="fp32")
        codes = hf.codes(w.pairs)
        cached = (torch.stack([q.image_codes for q in w.pairs]), torch.stack([q.image_chosen_codes for q in w.pairs]),
                  torch.stack([q.image_rejected_codes for q in w.pairs]))
        assert all(torch.equal(a, b) for a, b in zip(codes, cached)), "re-encoded pixels differ from the cached codes"
        with torch.no_grad():
            loss, lp = hf.loss(w.pairs, epoch=0)
        B = p.pairs
        base = {"loss": float(loss)}
        for side in SIDES:
            c, r = lp[f"{side}/chosen"].double(), lp[f"{side}/rejected"].double()
            rc, rr = lp[f"{side}/ref_chosen"].double(), lp[f"{side}/ref_rejected"].double()
            base[f"{side}/logps/chosen"] = float(c.sum() / B)
            base[f"{side}/logps/rejected"] = float(r.sum() / B)
            base[f"{side}/rewards/margins"] = float(0.2 * ((c - rc) - (r - rr)).sum() / B)
        del hf
        got = {"hermesflow": base}
        for provider in ("+packing", OURS):
            tr = make_trainer(w, provider, dtype="fp32")
            m = tr.train_step(0)
            got[provider] = {k: float(m[k]) for k in base}
            w.policy.load_state_dict(saved)
            del tr
        # a margin is a difference of four sums: its tolerance is rtol of the sums' scale (β·(|chosen| + |rejected|)·2)
        scale = {k: abs(b) for k, b in base.items()}
        for side in ("und", "gen"):
            scale[f"{side}/rewards/margins"] = 0.4 * (abs(base[f"{side}/logps/chosen"]) +
                                                      abs(base[f"{side}/logps/rejected"]))
        bad = [f"{prov} {k}: {v[k]:.6f} vs hermesflow {base[k]:.6f} (off by {abs(v[k] - base[k]) / scale[k]:.1e} of "
               f"its scale)" for prov, v in got.items() for k in base if abs(v[k] - base[k]) > rtol * scale[k]]
        assert not bad, "the steps disagree on the same batch:\n  " + "\n  ".join(bad)
    gc.collect()
    if p.device == "cuda":
        torch.cuda.empty_cache()
    return {prov: v["loss"] for prov, v in got.items()}


# ---------------------------------------------------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------------------------------------------------


def _time_steps(w: World, provider: str, reps: int, warmup: int) -> tuple[tuple[float, ...], list[float], object]:
    """(time quantiles, losses, PeakMemory) of ``provider``'s steps 0, 1, …; its optimizer goes when this returns."""
    run, _owner = make_runner(w, provider)
    counter = [0]
    losses: list[float] = []

    def step() -> None:
        losses.append(run(counter[0]))
        counter[0] += 1

    pm = hb.PeakMemory(w.p.device)
    times = hb.do_bench(step, warmup=warmup, rep=reps, device=w.p.device, first_call_ctx=pm)
    return times, losses, pm


def measure(p: Problem, provider: str, reps: int, warmup: int = 1, world: World | None = None) -> dict:
    """Warm up, time ``reps`` steps; the first timed step also measures the peak memory above the level at entry."""
    w = world or build_world(p)
    if provider == "+compile":
        warmup = max(warmup, 3)  # the first steps compile: the first shapes, the dynamic recompile, a one-row batch
    times, losses, pm = _time_steps(w, provider, reps, warmup)
    gc.collect()
    if p.device == "cuda":
        torch.cuda.empty_cache()
    works = [step_work(w, provider, k) for k in range(warmup, warmup + reps)]
    work = {k: sum(x[k] for x in works) / len(works) for k in works[0]}
    flops = model_flops(w.policy.config, work)
    peak = _peak_flops(torch.device(p.device)) if p.device == "cuda" else None
    return {
        "provider": provider,
        "problem": asdict(p),
        "time": list(times),
        "loss": losses[warmup] if len(losses) > warmup else None,
        "mem_extra": pm.growth,
        "peak_reset": pm.reset,
        "work": work,
        "model_flops": flops,
        "mfu": [flops / t / peak for t in times] if peak else None,
    }


def measure_in_subprocess(p: Problem, provider: str, reps: int, warmup: int, threads: int | None,
                          timeout: float | None) -> dict:
    """Two fresh processes: the timed steps under glibc's default allocator (as a training run has it), then the
    peak memory of one step in a process that mmaps every buffer ≥ 64 KiB (RSS follows live memory, but each large
    allocation pays fresh page faults)."""
    spec = {"problem": asdict(p), "provider": provider, "reps": reps, "warmup": warmup, "threads": threads}
    r = hb.run_worker("bench.bench_step", spec, threads, timeout, provider, track_rss=False)
    m = hb.run_worker("bench.bench_step", {**spec, "reps": 1}, threads, timeout, f"{provider} (memory)")
    r["mem_extra"], r["peak_reset"] = m["mem_extra"], m["peak_reset"]
    r["time_rss_process"] = m["time"][0]
    return r


def profile(p: Problem, provider: str, world: World, warmup: int, rows: int = 25) -> str:
    """One step of ``provider`` under torch.profiler after ``warmup`` steps: the top ops by self time."""
    run, _owner = make_runner(world, provider)
    for k in range(warmup):
        run(k)
    return hb.profile_table(lambda: run(warmup), p.device, rows)


# ---------------------------------------------------------------------------------------------------------------------
# rows, table, plot
# ---------------------------------------------------------------------------------------------------------------------


def add_rows(rec: hb.Recorder, r: dict, cfg: argparse.Namespace) -> None:
    """A measurement's rows: pairs_per_s, memory_extra and (on CUDA) mfu, the shapes and the work in the config."""
    p = Problem(**r["problem"])
    B = p.pairs
    t50, t20, t80 = r["time"]
    config = {**asdict(p), "V": p.vocab_size, "N": p.image_tokens,
              "row_len": p.row_len, "threads": cfg.threads or torch.get_num_threads(), "reps": cfg.reps,
              "step_time_s": t50, "loss": r["loss"], "peak_reset": r["peak_reset"], **r["work"],
              "model_tflop": r["model_flops"] / 1e12}
    if "time_rss_process" in r:  # the memory process's step time, for the record
        config["step_time_s_rss_process"] = r["time_rss_process"]
    common = dict(kernel_name=KERNEL, provider=r["provider"], x_name="pairs", x_value=B, config=config,
                  dtype=p.dtype)
    rec.add(metric="pairs_per_s", unit="1/s", y=(B / t50, B / t80, B / t20), **common)
    rec.add(metric="memory_extra", unit="MB", y=(r["mem_extra"] / hb.MB,), **common)
    if r["mfu"]:
        m50, m20, m80 = r["mfu"]
        rec.add(metric="mfu", unit="fraction", y=(m50, m80, m20), **common)


COLORS = {"hermesflow": "#999999", "+token_cache": "#c9b27c", "+packing": "#8fb0d8", "+fused_head": "#4c72b0",
          "+compile": "#55a868"}


def plot(rows: list[dict], out: str | Path) -> Path:
    """Bars of the newest run: pairs/s and memory_extra per provider, each against hermesflow's."""
    rows = [r for r in rows if r["kernel_name"] == KERNEL]
    if not rows:
        raise ValueError(f"no {KERNEL} rows to plot")
    c, r0 = json.loads(rows[-1]["extra_benchmark_config_str"]), rows[-1]
    title = (f"Pair-DPO step: d {c['d']}, {c['layers']} layers, V {c['V']}, N {c['N']}, B {c['pairs']}, "
             f"{r0['dtype']} — {r0['device_name']}, {r0['commit']}")
    panels = [(KERNEL, "pairs_per_s", "pairs / s (higher is better)"),
              (KERNEL, "memory_extra", "peak memory above weights + AdamW, MB (lower is better)")]
    return hb.plot_bars(rows, out, panels, order=PROVIDERS, colors=COLORS, baseline="hermesflow", title=title)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model + tokenizer sizes (overrides)")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=4, help="B: pairs per step")
    ap.add_argument("--image-size", type=int, default=256, help="pixels (N = (size/16)² image tokens)")
    ap.add_argument("--text-len", type=int, default=128, help="mmu text budget (t2i text part: +1)")
    ap.add_argument("--text-vocab", type=int, default=50295, help="text vocabulary (Show-o/phi-1.5: 50295)")
    ap.add_argument("--code-bits", type=int, default=13, help="LFQ bits (2^bits image codes; Show-o: 13)")
    ap.add_argument("--vq-ch", type=int, default=None, help="MAGVIT-v2 base width (default: scaled to the model)")
    ap.add_argument("--vq-groups", type=int, default=None, help="GroupNorm groups (default 8; 32 at ch ≥ 128)")
    ap.add_argument("--token-budget", type=int, default=None,
                    help="tokens per packed micro-batch (default: 1024 on CPU, 8192 on CUDA as the Show-o recipe)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="add the +compile row (default: on for CUDA, off on CPU)")
    hb.add_run_args(ap, reps=3, warmup=1, devices=None)
    ap.add_argument("--inprocess", action="store_true", help="CPU: measure in this process (no fresh-process RSS)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per CPU worker process")
    ap.add_argument("--skip-check", action="store_true", help="skip the loss-agreement check")
    ap.add_argument("--profile", default=None, help="providers to profile (one step each) instead of measuring")
    hb.add_output_args(ap, "step", BENCH_DIR)
    ap.add_argument("--plot", default=None, help="PNG ('' for none; default bench/plots/step.png)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.worker is not None:
        return cfg
    hb.require_device(ap, cfg.device)
    if cfg.dtype == "bf16" and cfg.device == "cpu":
        ap.error("--dtype bf16 is for CUDA (autocast); the CPU bench runs fp32")
    preset = PRESETS.get(cfg.preset, {})
    for k, v in preset.items():
        if k not in ("vq_ch", "vq_groups") or getattr(cfg, k) is None:
            setattr(cfg, k, v)
    shape = Problem(d=cfg.d, layers=cfg.layers, heads=cfg.heads, text_vocab=cfg.text_vocab, code_bits=cfg.code_bits)
    cfg.vq_ch = cfg.vq_ch or scaled_vq_ch(shape.model_config(shape.vocab_size))
    cfg.vq_groups = cfg.vq_groups or (32 if cfg.vq_ch % 32 == 0 and cfg.vq_ch >= 128 else 8)
    cfg.token_budget = cfg.token_budget or (8192 if cfg.device == "cuda" else 1024)
    if cfg.compile is None:
        cfg.compile = cfg.device == "cuda"
    names = cfg.providers.split(",") if cfg.providers else [n for n in PROVIDERS if n != "+compile" or cfg.compile]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
    cfg.providers = [n for n in PROVIDERS if n in names]  # each lever on top of the previous; +compile mutates
    return cfg


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(argv)
    if cfg.worker is not None:
        hb.worker_main(cfg.worker, measure, Problem)
        return []
    hb.set_threads(cfg.threads)
    p = Problem(d=cfg.d, layers=cfg.layers, heads=cfg.heads, pairs=cfg.pairs, image_size=cfg.image_size,
                text_len=cfg.text_len, text_vocab=cfg.text_vocab, code_bits=cfg.code_bits, vq_ch=cfg.vq_ch,
                vq_groups=cfg.vq_groups, token_budget=cfg.token_budget, dtype=cfg.dtype, device=cfg.device,
                seed=cfg.seed, compile="+compile" in cfg.providers)
    mc = p.model_config(p.vocab_size)
    body, head = mc.forward_flops(1, 0) / 2, mc.forward_flops(0, 1) / 2  # matmul weights: 2 FLOPs each per row
    print(f"step: d {p.d}, {p.layers} layers, {p.heads} heads, V {p.vocab_size}, N {p.image_tokens}, T {p.row_len}, "
          f"B {p.pairs}, {p.dtype} on {p.device}; matmul params {body / 1e6:.1f} M blocks + {head / 1e6:.1f} M head; "
          f"MAGVIT-v2 ch {p.vq_ch}; token budget {p.token_budget}", flush=True)
    inprocess = cfg.inprocess or cfg.device == "cuda" or cfg.profile
    world = build_world(p) if inprocess else None
    if not cfg.skip_check:
        losses = check_losses(p, world=world)
        print("check: same batch, fp32, losses agree within 1e-4: "
              + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()), flush=True)
    if cfg.profile:
        for name in cfg.profile.split(","):
            print(f"\n== profile of one {name} step (after {cfg.warmup} warm-up steps)")
            print(profile(p, name, world, max(cfg.warmup, 2 if name == "+compile" else 0)), flush=True)
        return []
    rec, results = hb.Recorder(hb.output_path(cfg, "step", BENCH_DIR), cfg.device, echo=True), []
    try:
        for name in cfg.providers:
            if inprocess:
                r = measure(p, name, cfg.reps, cfg.warmup, world=world)
            else:
                r = measure_in_subprocess(p, name, cfg.reps, cfg.warmup, cfg.threads, cfg.timeout)
            results.append(r)
            add_rows(rec, r, cfg)
            rec.flush()  # provider by provider, so an interrupted run keeps what it measured
    except KeyboardInterrupt:
        print("\ninterrupted: the table below has the providers measured so far")
    print()
    print(hb.rows_table(rec.rows, baseline="hermesflow", keys=("step_time_s", "tokens", "head_rows", "model_tflop")))
    base = next((r for r in results if r["provider"] == "hermesflow"), None)
    for name in (OURS, "+compile"):
        ours = next((r for r in results if r["provider"] == name), None)
        if base and ours:
            print(f"{name} / hermesflow: {base['time'][0] / ours['time'][0]:.2f}× pairs/s, "
                  f"{ours['mem_extra'] / max(base['mem_extra'], 1):.2f}× extra memory")
    rec.done()
    if rec.path and results and cfg.plot != "":
        print(f"plot: {plot(hb.read_rows(rec.path), cfg.plot or hb.plot_path(cfg, 'step', BENCH_DIR))}")
    return results

if __name__ == "__main__":
    main()
