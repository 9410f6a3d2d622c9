"""DPO and Pair-DPO losses on sequence log-probs alone, fwd+bwd: ``ops.dpo_loss`` / ``ops.pair_dpo_loss`` vs the
plain-torch twins in ``ops.reference``. Small and fast: B = 8..4096 pairs, (B,) inputs, time only.

This is the loss on top of the head (a handful of elementwise ops on B floats); it should stay in the noise next to
the head's GEMMs (``benchmarks.logprobs``). The numbers catch an accidental host sync or a Python loop over pairs.
Every run first checks ours against the reference (loss and gradients, 37 pairs).

    hermesflow bench dpo                                          # CPU, sigmoid, 8..4096 pairs
    hermesflow bench dpo --loss-type ipo --pairs 8,4096 --out /tmp/dpo.csv
    python -m hermesflow_fast.benchmarks.dpo --device cuda --kernels pair_dpo_loss --plot

Results: --out FILE, or <--results DIR>/dpo.csv; by default bench/results/dpo.csv when the current folder is a
checkout (it has bench/results), else ./bench-results/dpo.csv.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hermesflow_fast.benchmarks.harness import Axis, Ratio, Sweep, do_bench
from hermesflow_fast.ops import DPO_LOSS_TYPES, dpo_loss, pair_dpo_loss, reference

BETA = 0.1
KERNELS = ("dpo_loss", "pair_dpo_loss")

# (kernel_name, provider) -> fn(und, gen, loss_type) returning the scalar loss; und/gen are 4-tuples of (B,) logps
Case = Callable[[tuple, tuple, str], torch.Tensor]
CASES: dict[tuple[str, str], Case] = {
    ("dpo_loss", "ours"): lambda und, gen, lt: dpo_loss(*und, beta=BETA, loss_type=lt)[0],
    ("dpo_loss", "reference"): lambda und, gen, lt: reference.dpo_loss(*und, beta=BETA, loss_type=lt)[0],
    ("pair_dpo_loss", "ours"): lambda und, gen, lt: pair_dpo_loss(und, gen, beta=BETA, loss_type=lt)[0],
    ("pair_dpo_loss", "reference"): lambda und, gen, lt: reference.pair_dpo_loss(und, gen, beta=BETA, loss_type=lt),
}


@dataclass(frozen=True)
class Problem:
    kernel: str
    pairs: int
    loss_type: str = "sigmoid"
    device: str = "cpu"


def make_logps(pairs: int, device: str, seed: int = 0) -> tuple[tuple, tuple, list[torch.Tensor]]:
    """und and gen sides: policy logps (with grad) near the reference ones, as in training."""
    g = torch.Generator(device=device).manual_seed(seed)
    sides, leaves = [], []
    for _ in range(2):
        ref = -200 + 20 * torch.randn(2, pairs, generator=g, device=device)
        pol = (ref + torch.randn(2, pairs, generator=g, device=device)).requires_grad_()
        leaves.append(pol)
        sides.append((pol[0], pol[1], ref[0], ref[1]))
    return sides[0], sides[1], leaves


def measure(p: Problem, provider: str, reps: int, warmup: int) -> dict:
    """Time ``reps`` fwd+bwd calls (the gradients dropped before each)."""
    und, gen, leaves = make_logps(p.pairs, p.device)
    fn = CASES[(p.kernel, provider)]
    t = do_bench(lambda: fn(und, gen, p.loss_type).backward(), warmup=warmup, rep=reps, device=p.device,
                 setup=lambda: [setattr(x, "grad", None) for x in leaves])
    return {"time": list(t)}


def check(device: str, loss_type: str, rtol: float = 1e-5) -> None:
    """Each kernel's ``ours`` vs ``reference``: loss and gradients, at 37 pairs."""
    for kernel in KERNELS:
        out = {}
        for provider in ("ours", "reference"):
            und, gen, leaves = make_logps(37, device)
            loss = CASES[(kernel, provider)](und, gen, loss_type)
            loss.backward()
            out[provider] = (loss.detach(), [t.grad for t in leaves])
        (l0, g0), (l1, g1) = out["ours"], out["reference"]
        torch.testing.assert_close(l0, l1.to(l0.dtype), rtol=rtol, atol=1e-6, msg=f"{kernel} loss")
        for a, b in zip(g0, g1, strict=True):
            if a is None and b is None:
                continue
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7, msg=f"{kernel} grad")


def _check(cfg: argparse.Namespace) -> str:
    check(cfg.device, cfg.loss_type)
    return f"check: ops match reference (loss and grads) for {cfg.loss_type}"


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--loss-type", choices=DPO_LOSS_TYPES, default="sigmoid")


SWEEP = Sweep(
    name="dpo", module="hermesflow_fast.benchmarks.dpo", doc=__doc__, kernel=lambda point: point["kernel"],
    axes=[Axis("kernel", KERNELS, "kernels", type=str, flag="--kernels"),
          Axis("pairs", (8, 32, 128, 512, 2048, 4096), "pairs per call")],
    providers=("reference", "ours"), problem_type=Problem, measure=measure,
    problem=lambda pt, cfg: Problem(pt["kernel"], pt["pairs"], cfg.loss_type, cfg.device),
    check=_check, always_check=True, dtypes=("fp32",), reps=(100, 100), warmup=(10, 10), time_unit="µs",
    options=_options, ratios=[Ratio("÷ref", "reference")],
    validate=lambda cfg: None if set(cfg.kernel) <= set(KERNELS) else f"--kernels: each of {','.join(KERNELS)}",
    config=lambda r, cfg: {"loss_type": cfg.loss_type, "beta": BETA},
    title=lambda cfg: f"DPO losses on (B,) sequence log-probs, fwd+bwd, {cfg.loss_type}, β={BETA}",
)
main = SWEEP.main

if __name__ == "__main__":
    main()
