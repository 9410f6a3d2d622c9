"""Fused LM head + log-softmax + gather + DPO loss, fwd+bwd of policy and reference: ours vs naive, TRL, liger, torch.

Workload (Show-o Pair-DPO's head). At x = T_policy tokens per step (chosen + rejected):
    B = T_policy / (2·seq) pairs of ``seq``-token sequences (256 by default; shorter when T_policy < 2·seq),
    hidden (2B, seq, H) with grad, head weight (V, H) and bias (V,) with grad (Show-o's head has a bias),
    reference hidden (2B, seq, H) without grad through the same head (the same tensors, detached),
    targets random with ~5% ignore_index, DPO sigmoid loss (β = 0.1) on the summed sequence log-probs.
One timed call = forward + ``loss.backward()``. Defaults: CPU, H=2048, V=58498 (Show-o), fp32, 512..8192 tokens.

Providers (logprobs_providers.py; all compute the same loss on the same inputs; ``--check`` asserts it, and the
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
                   on CUDA with Triton: Triton kernels there, whose backward is dw_mode="owned" for bf16 / fp16).
    ours_twopass_atomic  the same with the Triton backward's dw_mode="atomic" (fp32 dx / dW buffers and atomics),
                   for comparison (only via --providers).

Memory ("memory_extra", MB) = peak − (memory with the inputs built) − (sizes of hidden.grad, weight.grad and
bias.grad in the input dtype), the same subtraction for every provider: the bytes an op needs beyond its inputs and
their unavoidable gradients. On CPU each (provider, size) runs in a fresh process started with
MALLOC_MMAP_THRESHOLD_=65536; after one warm-up call VmHWM is reset via /proc/self/clear_refs and the first timed
call is measured (see measure.py). On CUDA: torch.cuda max_memory_allocated. Sizes whose estimated need exceeds
--mem-fraction (0.8) of the available memory are skipped, as are larger sizes of a provider that failed.

    hermesflow bench logprobs                         # the full CPU sweep (slow: minutes per size)
    hermesflow bench logprobs --H 256 --V 4000 --tokens 256,512 --reps 2 --out /tmp/x.csv --check
    hermesflow bench logprobs --device cuda --dtype bf16 --tokens 1024,2048,4096,8192,16384 --reps 10
    hermesflow bench logprobs --grid --device cuda --dtype bf16      # the chunk-budget shapes, below
    hermesflow bench logprobs --grid --plan                          # their chunking, computed, nothing run
    python -m hermesflow_fast.benchmarks.logprobs --quick --plot     # the same module, a small sweep and its PNG

Results: --out FILE, or <--results DIR>/logprobs.csv; by default bench/results/logprobs.csv when the current folder
is a checkout (it has bench/results), else ./bench-results/logprobs.csv.

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

import torch

from hermesflow_fast.benchmarks.harness import Axis, Column, Ratio, Sweep, time_and_memory
from hermesflow_fast.benchmarks.logprobs_providers import (
    BETA,
    DEFAULT_PROVIDERS,
    IGNORE_FRAC,
    PROVIDERS,
    RUN_ORDER,
    TIME_ONLY,
    Problem,
    build_inputs,
    check_providers,
    estimate_bytes,
    plan_table,
    provider_available,
)
from hermesflow_fast.ops.logprobs import default_chunk_rows

KERNEL = "fused_linear_dpo"
SHOW_O_H, SHOW_O_V = 2048, 58498
GRID = {"H": [1024, 2048, 4096], "V": [32768, 58498, 151936], "tokens": [2048, 4096, 8192],
        "providers": ["gemm_floor", "ours", "naive"]}
QUICK = {"tokens": [512, 1024], "H": [512], "V": [8192], "reps": 2}


def measure(p: Problem, provider: str, reps: int, warmup: int = 1) -> dict:
    """Build inputs, warm up, time ``reps`` fwd+bwd calls; one call also measures peak memory (not gemm_floor's)."""
    inp = build_inputs(p)
    fwd = PROVIDERS[provider](inp)
    losses: list[float] = []

    def step() -> None:
        loss = fwd()
        if loss is not None:
            loss.backward()
            if not losses:
                losses.append(float(loss.detach()))

    times, pm = time_and_memory(step, p.device, reps, warmup, setup=inp.zero_grads, memory=provider not in TIME_ONLY)
    return {"time": list(times), "loss": losses[0] if losses else None, "valid_rows": inp.valid_rows,
            "grad_bytes": inp.grad_bytes(), "mem_growth": pm.growth if pm else None,
            "mem_extra": pm.growth - inp.grad_bytes() if pm else None, "peak_reset": pm.reset if pm else None}


def _check(cfg: argparse.Namespace) -> str:
    losses = check_providers(cfg.providers, cfg.device)
    return ("check: losses and grads agree with naive at H=64 V=500, 4 seqs × 32 tokens (1e-4 relative): "
            + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))


def _report_agreement(rs: list[dict]) -> None:
    losses = {r["provider"]: r["loss"] for r in rs if r["loss"] is not None}
    if len(losses) < 2:
        return
    base_name = "naive" if "naive" in losses else next(iter(losses))
    base = losses[base_name]
    worst = max((abs(v - base) / abs(base), k) for k, v in losses.items() if k != base_name)
    note = "" if worst[0] <= 1e-3 else "  <-- larger than 1e-3"
    print(f"  losses agree to {worst[0]:.1e} relative to {base_name} (worst: {worst[1]}){note}", flush=True)


def gemm_flops(r: dict) -> float:
    """FLOPs of the 4 GEMMs of the exact-method floor: 3 policy (fwd, dX, dW) + 1 reference, over valid rows."""
    return 8.0 * r["valid_rows"] * r["problem"]["V"] * r["problem"]["H"]


def _config(r: dict, cfg: argparse.Namespace) -> dict:
    p = r["problem"]
    return {"pairs": p["tokens"] // (2 * p["seq"]), "seq": p["seq"], "bias": p["bias"], "beta": BETA,
            "loss_type": "sigmoid", "ignore_frac": IGNORE_FRAC, "valid_tokens": r["valid_rows"],
            "memory": "peak - inputs - grads(hidden, weight, bias)",
            "chunk_rows": default_chunk_rows(r["valid_rows"], p["V"], torch.device(p["device"]))}  # ours' budget


def _validate(cfg: argparse.Namespace) -> str | None:
    for tokens in cfg.tokens:
        try:
            Problem.make(tokens, cfg.seq, cfg.H[0], cfg.V[0])
        except ValueError as e:
            return str(e)
    return None


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--plan", action="store_true",
                    help="print ours' chunking and the modelled extra memory of each point, run nothing")


SWEEP = Sweep(
    name="logprobs", module="hermesflow_fast.benchmarks.logprobs", doc=__doc__, kernel=KERNEL,
    axes=[Axis("H", (SHOW_O_H,), "hidden sizes"), Axis("V", (SHOW_O_V,), "vocabularies"),
          Axis("tokens", (512, 1024, 2048, 4096, 8192), "T_policy values", column="T_policy")],
    providers=tuple(PROVIDERS), default_providers=DEFAULT_PROVIDERS, run_order=RUN_ORDER,
    available=provider_available, problem_type=Problem, measure=measure, estimate_bytes=estimate_bytes,
    problem=lambda pt, cfg: Problem.make(pt["tokens"], cfg.seq, pt["H"], pt["V"], dtype=cfg.dtype, device=cfg.device),
    check=_check, fresh_process=True, reps=(3, 10), warmup=(1, 3), config=_config, options=_options,
    validate=_validate, after_point=_report_agreement,
    presets={"quick": ("small sweep for a sanity run: tokens 512,1024 at H=512, V=8192, 2 reps (unless given)", QUICK),
             "grid": ("the chunk-budget shapes: H 1024,2048,4096 × V 32768,58498,151936 × tokens 2048,4096,8192, "
                      "providers gemm_floor,ours,naive (each unless given)", GRID)},
    ratios=[Ratio("×floor", "gemm_floor"), Ratio("×naive", "naive"), Ratio("÷naive", "naive", "memory", ".3f")],
    columns=[Column("pairs", lambda r: str(r["problem"]["tokens"] // (2 * r["problem"]["seq"]))),
             Column("TFLOP/s", lambda r: f"{gemm_flops(r) / r['time'][0] / 1e12:.3f}"),
             Column("loss", lambda r: "" if r["loss"] is None else f"{r['loss']:.6f}")],
    title=lambda cfg: (f"{KERNEL} fwd+bwd, policy + reference head, DPO sigmoid β={BETA}\n"
                       "extra MB = peak − inputs − grads(hidden, weight, bias); "
                       "TFLOP/s = the 4 floor GEMMs (8·R·V·H) / time"),
)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep the arguments describe (or, with --plan, print ours' chunking of each point); returns the
    measurements (dicts) and appends their rows to the CSV."""
    cfg = SWEEP.parse_args(argv)
    if cfg.worker is None and cfg.plan:
        print(plan_table([SWEEP.problem(pt, cfg) for pt in SWEEP.points(cfg)]))
        return []
    return SWEEP.main(cfg=cfg)


if __name__ == "__main__":
    main()
