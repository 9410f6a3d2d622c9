"""Fused LM head + log-softmax + gather + DPO loss, fwd+bwd of policy and reference: ours vs naive, TRL, liger, torch.

Workload (Show-o Pair-DPO's head, perf-anchors §2). At x = T_policy tokens per step (chosen + rejected):
    B = T_policy / (2·seq) pairs of ``seq``-token sequences (256 by default; shorter when T_policy < 2·seq),
    hidden (2B, seq, H) with grad, head weight (V, H) and bias (V,) with grad (Show-o's head has a bias),
    reference hidden (2B, seq, H) without grad through the same head (the same tensors, detached),
    targets random with ~5% ignore_index, DPO sigmoid loss (β = 0.1) on the summed sequence log-probs.
One timed call = forward + ``loss.backward()``. Defaults: CPU, H=2048, V=58498 (Show-o), fp32, 512..8192 tokens.

Providers (bench/logprobs_world.py; all compute the same loss on the same inputs; ``--check`` asserts it, and the
gradients, at a tiny shape):
    gemm_floor     the 4 GEMMs any exact method needs, over the non-ignored rows R: X Wᵀ, G W, Gᵀ X (policy fwd,
                   dX, dW) and Xr Wᵀ (reference fwd); G (R, V) is made outside the timed region. Time only.
    naive          ``reference.fused_linear_dpo``: HermesFlow's path, materialized logits + log_softmax + gather
                   (it also computes liger's aux outputs, logits mean and NLL, the naive way).
    trl            TRL's path: full logits X Wᵀ + b, ``reference.selective_logprobs`` (gather − per-sequence
                   logsumexp) with ignored targets set to 0 and masked, summed per sequence, ``ops.dpo_loss``.
    liger          ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(compiled=False)``, when importable.
    liger_compiled the same with compiled=True (only via --providers: its first call compiles, ~30 s on CPU).
    torch_lce      ``F.linear_cross_entropy(..., reduction='none', options=LinearCrossEntropyOptions())``,
                   torch's chunked path; logp = −nll, summed per sequence, then ``ops.dpo_loss``.
    ours           ``ops.FusedLinearDPOLoss(backend="chunked")``: gradients computed in forward (the default on CPU).
    ours_twopass   ``ops.fused_linear_dpo_loss(..., backend="twopass")``: linear_logprobs + dpo_loss (the default
                   on CUDA with Triton: Triton kernels there).

Memory ("memory_extra", MB) = peak − (memory with the inputs built) − (sizes of hidden.grad, weight.grad and
bias.grad in the input dtype), the same subtraction for every provider: the bytes an op needs beyond its inputs and
their unavoidable gradients. On CPU each (provider, size) runs in a fresh process started with
MALLOC_MMAP_THRESHOLD_=65536; after one warm-up call VmHWM is reset via /proc/self/clear_refs and the first timed
call is measured (see bench/utils.py). On CUDA: torch.cuda max_memory_allocated. Sizes whose estimated need exceeds
--mem-fraction (0.8) of the available memory are skipped, as are larger sizes of a provider that failed.

    python -m bench.bench_logprobs                                   # the full CPU sweep (slow: minutes per size)
    python -m bench.bench_logprobs --H 256 --V 4000 --tokens 256,512 --reps 2 --out /tmp/x.csv --check
    python -m bench.bench_logprobs --device cuda --dtype bf16 --tokens 1024,2048,4096,8192,16384 --reps 10
    python -m bench.bench_logprobs --grid --device cuda --dtype bf16      # the chunk-budget shapes, below
    python -m bench.bench_logprobs --grid --plan                          # their chunking, computed, nothing run
    python -m bench.plot bench/results/logprobs.csv

--H and --V take comma-separated lists (every pair is swept). ``--grid`` is the set of heads the default chunk
budget of the fused op is sized for: H ∈ {1024, 2048, 4096} × V ∈ {32768, 58498, 151936} at 2048, 4096 and 8192
tokens, providers gemm_floor, ours and naive (targets: ours ≤ 1/8 of naive's extra memory, ≤ 1.1× the floor's
time). ``--plan`` prints, for each point, the chunks the op will cut (whole pairs, ``default_chunk_rows``), the
largest chunk's fp32 logits, and the model of both extras: ours ≈ the largest chunk's logits plus its (rows, H)
gathers in fp32, naive ≥ 2.96 × the (T_policy, V) fp32 logits (the smallest multiple measured from 2048 tokens up
in bench/results/logprobs.csv), without building a tensor.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from bench import utils
from bench.logprobs_world import (  # Problem, DEFAULT_PROVIDERS, TIME_ONLY, provider_available: also bl.*
    BETA,
    DEFAULT_PROVIDERS,
    IGNORE_FRAC,
    PROVIDERS,
    RUN_ORDER,
    TIME_ONLY,
    Problem,
    build_inputs,
    estimate_bytes,
    plan_table,
    provider_available,
)
from hermesflow_fast.ops.logprobs import default_chunk_rows

KERNEL = "fused_linear_dpo"
SHOW_O_H, SHOW_O_V = 2048, 58498
DEFAULT_TOKENS = (512, 1024, 2048, 4096, 8192)
GRID = {"H": [1024, 2048, 4096], "V": [32768, 58498, 151936], "tokens": [2048, 4096, 8192],
        "providers": ["gemm_floor", "ours", "naive"]}


# ---------------------------------------------------------------------------------------------------------------------
# one measurement (in this process)
# ---------------------------------------------------------------------------------------------------------------------


def measure(p: Problem, provider: str, reps: int, warmup: int = 1) -> dict:
    """Build inputs, warm up, time ``reps`` fwd+bwd calls; the first timed call also measures peak memory."""
    inp = build_inputs(p)
    fwd = PROVIDERS[provider](inp)
    losses: list[float] = []

    def step() -> None:
        loss = fwd()
        if loss is not None:
            loss.backward()
            if not losses:
                losses.append(float(loss.detach()))

    with_memory = provider not in TIME_ONLY
    pm = utils.PeakMemory(p.device) if with_memory else None
    cold_memory = with_memory and p.device == "cpu" and not utils.can_reset_cpu_peak()
    if cold_memory:  # VmHWM cannot be reset: measure the first call after the inputs (fresh process), untimed
        inp.zero_grads()
        with pm:
            step()
        times = utils.do_bench(step, warmup=max(0, warmup - 1), rep=reps, setup=inp.zero_grads, device=p.device)
    else:
        times = utils.do_bench(
            step, warmup=warmup, rep=reps, setup=inp.zero_grads, device=p.device, first_call_ctx=pm
        )
    out = {
        "provider": provider,
        "problem": asdict(p),
        "time": list(times),
        "loss": losses[0] if losses else None,
        "valid_rows": inp.valid_rows,
        "grad_bytes": inp.grad_bytes(),
        "mem_growth": pm.growth if pm else None,
        "mem_extra": pm.growth - inp.grad_bytes() if pm else None,
        "peak_reset": pm.reset if pm else None,
    }
    return out


def measure_in_subprocess(p: Problem, provider: str, reps: int, warmup: int, threads: int | None,
                          timeout: float | None) -> dict:
    """``measure`` in a fresh ``python -m bench.bench_logprobs --worker`` process (CPU memory needs a fresh RSS)."""
    spec = {"problem": asdict(p), "provider": provider, "reps": reps, "warmup": warmup, "threads": threads}
    return utils.run_worker("bench.bench_logprobs", spec, threads, timeout, f"{provider} at {p.tokens} tokens")


# ---------------------------------------------------------------------------------------------------------------------
# correctness gate
# ---------------------------------------------------------------------------------------------------------------------


def check_providers(providers, device: str = "cpu", rtol: float = 1e-4) -> dict[str, float]:
    """Every provider's loss, and its hidden/weight/bias gradients, against ``naive`` at a tiny fp32 shape.

    Raises AssertionError naming the providers that disagree by more than ``rtol`` (relative to the largest
    magnitude of the naive value). Returns the losses.
    """
    p = Problem.make(tokens=128, seq=32, H=64, V=500, device=device)
    inp = build_inputs(p)
    names = ["naive"] + [n for n in providers if n not in TIME_ONLY and n != "naive"]
    losses, grads = {}, {}
    for name in names:
        inp.zero_grads()
        loss = PROVIDERS[name](inp)()
        loss.backward()
        losses[name] = float(loss.detach())
        grads[name] = [t.grad.detach().clone() for t in (inp.x, inp.w, inp.b) if t is not None]
    bad = []
    base = losses["naive"]
    for name in names[1:]:
        if abs(losses[name] - base) > rtol * abs(base):
            bad.append(f"{name}: loss {losses[name]:.8g} vs naive {base:.8g}")
        for label, g, g0 in zip(("hidden", "weight", "bias"), grads[name], grads["naive"], strict=True):
            err, scale = (g.float() - g0.float()).abs().max().item(), g0.float().abs().max().item()
            if err > rtol * scale:
                bad.append(f"{name}: {label}.grad max err {err:.3g} vs max |grad| {scale:.3g}")
    if bad:
        raise AssertionError("providers disagree with naive at a tiny shape:\n  " + "\n  ".join(bad))
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# sweep, CSV, table
# ---------------------------------------------------------------------------------------------------------------------


def gemm_flops(r: dict) -> float:
    """FLOPs of the 4 GEMMs of the exact-method floor: 3 policy (fwd, dX, dW) + 1 reference, over valid rows."""
    p = r["problem"]
    return 8.0 * r["valid_rows"] * p["V"] * p["H"]


def run_sweep(cfg: argparse.Namespace, on_result: Callable[[dict], object] | None = None) -> list[dict]:
    """Every (H, V, tokens, provider) point, smallest size first for each head; ``on_result`` sees each
    measurement as it lands. A provider that fails or is skipped at a size is skipped at the larger sizes of that
    head."""
    subprocs = cfg.device == "cpu" and not cfg.inprocess
    results, dropped = [], set()
    for h, v, tokens in ((h, v, t) for h in cfg.H for v in cfg.V for t in sorted(cfg.tokens)):
        p = Problem.make(tokens, cfg.seq, h, v, dtype=cfg.dtype, device=cfg.device)
        for name in sorted(cfg.providers, key=RUN_ORDER.index):
            if (name, h, v) in dropped:
                print(f"  skip {name} at H={h} V={v} {tokens} tokens: it failed or was skipped at a smaller size",
                      flush=True)
                continue
            need, avail = estimate_bytes(name, p), utils.available_bytes(cfg.device)
            if need > cfg.mem_fraction * avail:
                print(
                    f"  skip {name} at {tokens} tokens: needs ~{need / utils.MB:,.0f} MB, "
                    f"{cfg.mem_fraction:.0%} of available is {cfg.mem_fraction * avail / utils.MB:,.0f} MB",
                    flush=True,
                )
                dropped.add((name, h, v))
                continue
            t0 = time.perf_counter()
            try:
                if subprocs:
                    r = measure_in_subprocess(p, name, cfg.reps, cfg.warmup, cfg.threads, cfg.worker_timeout)
                else:
                    r = measure(p, name, cfg.reps, cfg.warmup)
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # torch OOM errors are RuntimeErrors
                print(f"  FAILED {name} at H={h} V={v} {tokens} tokens: {e}", flush=True)
                dropped.add((name, h, v))
                continue
            finally:  # in process: free this point's inputs and cached blocks before the next one
                gc.collect()
                if cfg.device == "cuda":
                    torch.cuda.empty_cache()
            mem = "" if r["mem_extra"] is None else f", extra {r['mem_extra'] / utils.MB:,.1f} MB"
            print(
                f"  H={h} V={v} {tokens:>6} tokens  {name:<14} {r['time'][0]:.4g} s{mem}  "
                f"({time.perf_counter() - t0:.0f} s wall)",
                flush=True,
            )
            results.append(r)
            if on_result is not None:
                on_result(r)
        _report_agreement([r for r in results if r["problem"] == asdict(p)], cfg)
    return results


def _report_agreement(rs: list[dict], cfg: argparse.Namespace) -> None:
    losses = {r["provider"]: r["loss"] for r in rs if r["loss"] is not None}
    if len(losses) < 2:
        return
    base_name = "naive" if "naive" in losses else next(iter(losses))
    base = losses[base_name]
    worst = max((abs(v - base) / abs(base), k) for k, v in losses.items() if k != base_name)
    note = "" if worst[0] <= 1e-3 else "  <-- larger than 1e-3"
    print(f"  losses agree to {worst[0]:.1e} relative to {base_name} (worst: {worst[1]}){note}", flush=True)


def config_of(r: dict, cfg: argparse.Namespace) -> dict:
    p = r["problem"]
    return {
        "H": p["H"], "V": p["V"], "dtype": p["dtype"], "pairs": p["tokens"] // (2 * p["seq"]), "seq": p["seq"],
        "bias": p["bias"], "threads": torch.get_num_threads() if cfg.threads is None else cfg.threads,
        "device": p["device"], "beta": BETA, "loss_type": "sigmoid", "ignore_frac": IGNORE_FRAC,
        "valid_tokens": r["valid_rows"], "reps": cfg.reps, "warmup": cfg.warmup, "peak_reset": r["peak_reset"],
        "memory": "peak - inputs - grads(hidden, weight, bias)",
        "chunk_rows": default_chunk_rows(r["valid_rows"], p["V"], torch.device(p["device"])),  # ours' budget
    }


def to_rows(results: list[dict], cfg: argparse.Namespace, stamps: dict | None = None) -> list[dict]:
    stamps = stamps or utils.run_stamps(cfg.device)
    rows = []
    for r in results:
        common = dict(
            kernel_name=KERNEL, provider=r["provider"], x_name="T_policy", x_value=r["problem"]["tokens"],
            config=config_of(r, cfg), device=cfg.device, dtype=cfg.dtype, stamps=stamps,
        )
        rows.append(utils.make_row(metric="time", unit="s", y=r["time"], **common))
        if r["mem_extra"] is not None:
            rows.append(utils.make_row(metric="memory_extra", unit="MB", y=[r["mem_extra"] / utils.MB] * 3, **common))
    return rows


def _ratio(value: float | None, base: float | None, fmt: str = ".2f") -> str:
    return "" if value is None or not base else format(value / base, fmt)


def format_table(results: list[dict], cfg: argparse.Namespace) -> str:
    head = (
        f"{KERNEL} fwd+bwd, policy + reference head, DPO sigmoid β={BETA}: {cfg.dtype} on "
        f"{utils.device_name(cfg.device)} ({cfg.device}, {torch.get_num_threads()} threads), "
        f"median of {cfg.reps} reps\n"
        "extra MB = peak − inputs − grads(hidden, weight, bias); TFLOP/s = the 4 floor GEMMs (8·R·V·H) / time\n"
    )
    cols = f"{'H':>5} {'V':>7} {'tokens':>6} {'pairs':>5}  {'provider':<14} {'time s':>9} {'[q20, q80]':>19} " \
           f"{'×floor':>7} {'×naive':>7} {'TFLOP/s':>8} {'extra MB':>10} {'÷naive':>7} {'loss':>10}"
    lines = [head, cols, "-" * len(cols)]
    order = {n: i for i, n in enumerate(PROVIDERS)}
    points = sorted({(r["problem"]["H"], r["problem"]["V"], r["problem"]["tokens"]) for r in results})
    for h, v, tokens in points:
        rs = sorted((r for r in results if (r["problem"]["H"], r["problem"]["V"], r["problem"]["tokens"]) ==
                     (h, v, tokens)), key=lambda r: order[r["provider"]])
        by = {r["provider"]: r for r in rs}
        floor, naive = by.get("gemm_floor"), by.get("naive")
        for r in rs:
            t = r["time"]
            mem = "n/a" if r["mem_extra"] is None else f"{r['mem_extra'] / utils.MB:,.1f}"
            loss = "" if r["loss"] is None else f"{r['loss']:.6f}"
            lines.append(
                f"{h:>5} {v:>7} {tokens:>6} {r['problem']['tokens'] // (2 * r['problem']['seq']):>5}  "
                f"{r['provider']:<14} {t[0]:>9.4f} {f'[{t[1]:.4f}, {t[2]:.4f}]':>19} "
                f"{_ratio(t[0], floor and floor['time'][0]):>7} {_ratio(t[0], naive and naive['time'][0]):>7} "
                f"{gemm_flops(r) / t[0] / 1e12:>8.3f} {mem:>10} "
                f"{_ratio(r['mem_extra'], naive and naive['mem_extra'], '.3f'):>7} {loss:>10}"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_logprobs", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tokens", type=_ints, default=None,
                    help=f"T_policy values, comma separated (default {','.join(map(str, DEFAULT_TOKENS))})")
    ap.add_argument("--providers", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                    help=f"comma separated, from {','.join(PROVIDERS)} (default {','.join(DEFAULT_PROVIDERS)})")
    ap.add_argument("--H", type=_ints, default=None, help=f"hidden sizes, comma separated (default {SHOW_O_H}, Show-o)")
    ap.add_argument("--V", type=_ints, default=None, help=f"vocabularies, comma separated (default {SHOW_O_V}, Show-o)")
    ap.add_argument("--grid", action="store_true",
                    help="the chunk-budget shapes: H 1024,2048,4096 × V 32768,58498,151936 × tokens 2048,4096,8192, "
                         "providers gemm_floor,ours,naive (each unless given)")
    ap.add_argument("--plan", action="store_true",
                    help="print ours' chunking and the modelled extra memory of each point, run nothing")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--dtype", choices=tuple(utils.DTYPES), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per point (default 3 on CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1 on CPU, 3 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=str(utils.RESULTS_DIR / "logprobs.csv"), help="CSV to append to ('' for none)")
    ap.add_argument("--quick", action="store_true",
                    help="small sweep for a sanity run: tokens 512,1024 at H=512, V=8192, 2 reps (unless given)")
    ap.add_argument("--check", action="store_true",
                    help="first assert every provider's loss and grads match naive at a tiny shape (1e-4 relative)")
    ap.add_argument("--inprocess", action="store_true",
                    help="measure in this process (CPU memory numbers are then approximate)")
    ap.add_argument("--mem-fraction", type=float, default=0.8,
                    help="skip a point whose estimated need exceeds this fraction of available memory")
    ap.add_argument("--worker-timeout", type=float, default=None, help="seconds per CPU measurement process")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.worker is not None:
        return cfg
    if cfg.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    quick = {"tokens": [512, 1024], "H": [512], "V": [8192], "reps": 2} if cfg.quick else {}
    preset = GRID if cfg.grid else quick
    cfg.tokens = cfg.tokens or preset.get("tokens", list(DEFAULT_TOKENS))
    cfg.H = cfg.H or preset.get("H", [SHOW_O_H])
    cfg.V = cfg.V or preset.get("V", [SHOW_O_V])
    cfg.reps = cfg.reps or preset.get("reps", 10 if cfg.device == "cuda" else 3)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (3 if cfg.device == "cuda" else 1)
    providers = cfg.providers or preset.get("providers", list(DEFAULT_PROVIDERS))
    unknown = [n for n in providers if n not in PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; choose from {','.join(PROVIDERS)}")
    cfg.providers = []
    for name in providers:
        ok, why = provider_available(name)
        if ok:
            cfg.providers.append(name)
        else:
            print(f"note: skipping provider {name}: {why}")
    for tokens in cfg.tokens:
        try:
            Problem.make(tokens, cfg.seq, cfg.H[0], cfg.V[0])
        except ValueError as e:
            ap.error(str(e))
    return cfg


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep the arguments describe; returns the measurements (dicts) and appends them to ``--out``."""
    cfg = parse_args(argv)
    if cfg.worker is not None:
        utils.worker_main(cfg.worker, measure, Problem)
        return []
    if cfg.plan:
        print(plan_table([Problem.make(t, cfg.seq, h, v, dtype=cfg.dtype, device=cfg.device)
                          for h in cfg.H for v in cfg.V for t in sorted(cfg.tokens)]))
        return []
    cfg.threads = cfg.threads or None
    utils.set_threads(cfg.threads)
    if cfg.check:
        losses = check_providers(cfg.providers, cfg.device)
        print("check: losses and grads agree with naive at H=64 V=500, 4 seqs × 32 tokens (1e-4 relative): "
              + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()), flush=True)
    where = "one fresh process per point" if cfg.device == "cpu" and not cfg.inprocess else "in process"
    print(f"sweep: tokens {cfg.tokens}, providers {cfg.providers}, {where}", flush=True)
    stamps, results, n_rows = utils.run_stamps(cfg.device), [], [0]

    def keep(r: dict) -> None:  # row by row, so an interrupted sweep keeps what it measured
        results.append(r)
        if cfg.out:
            rows = to_rows([r], cfg, stamps)
            utils.append_rows(cfg.out, rows)
            n_rows[0] += len(rows)

    try:
        run_sweep(cfg, keep)
    except KeyboardInterrupt:
        print("\ninterrupted: the table below has the points measured so far")
    print()
    print(format_table(results, cfg))
    if cfg.out:
        print(f"appended {n_rows[0]} rows to {cfg.out}")
    return results


if __name__ == "__main__":
    main()
