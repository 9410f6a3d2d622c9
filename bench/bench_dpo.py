"""DPO and Pair-DPO losses on sequence log-probs alone, fwd+bwd: ``ops.dpo_loss`` / ``ops.pair_dpo_loss`` vs the
plain-torch twins in ``ops.reference``. Small and fast: B = 8..4096 pairs, (B,) inputs, time only.

This is the loss on top of the head (a handful of elementwise ops on B floats); it should stay in the noise next to
the head's GEMMs (bench_logprobs). The numbers catch an accidental host sync or a Python loop over pairs.

    python -m bench.bench_dpo                                     # CPU, sigmoid, 8..4096 pairs
    python -m bench.bench_dpo --loss-type ipo --pairs 8,4096 --out /tmp/dpo.csv
    python -m bench.bench_dpo --device cuda
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench import utils
from hermesflow_fast.ops import DPO_LOSS_TYPES, dpo_loss, pair_dpo_loss, reference

DEFAULT_PAIRS = (8, 32, 128, 512, 2048, 4096)
BETA = 0.1

# (kernel_name, provider) -> fn(und, gen, loss_type) returning the scalar loss; und/gen are 4-tuples of (B,) logps
Case = Callable[[tuple, tuple, str], torch.Tensor]
CASES: dict[tuple[str, str], Case] = {
    ("dpo_loss", "ours"): lambda und, gen, lt: dpo_loss(*und, beta=BETA, loss_type=lt)[0],
    ("dpo_loss", "reference"): lambda und, gen, lt: reference.dpo_loss(*und, beta=BETA, loss_type=lt)[0],
    ("pair_dpo_loss", "ours"): lambda und, gen, lt: pair_dpo_loss(und, gen, beta=BETA, loss_type=lt)[0],
    ("pair_dpo_loss", "reference"): lambda und, gen, lt: reference.pair_dpo_loss(und, gen, beta=BETA, loss_type=lt),
}


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


def check(device: str, loss_type: str, rtol: float = 1e-5) -> None:
    """Each kernel's ``ours`` vs ``reference``: loss and gradients, at 37 pairs."""
    for kernel in ("dpo_loss", "pair_dpo_loss"):
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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_dpo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=lambda s: [int(v) for v in s.split(",") if v], default=list(DEFAULT_PAIRS))
    ap.add_argument("--loss-type", choices=DPO_LOSS_TYPES, default="sigmoid")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(utils.RESULTS_DIR / "dpo.csv"), help="CSV to append to ('' for none)")
    cfg = ap.parse_args(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    threads = utils.set_threads(cfg.threads)
    check(cfg.device, cfg.loss_type)
    print(f"check: ops match reference (loss and grads) for {cfg.loss_type}")
    stamps = utils.run_stamps(cfg.device)
    rows, results = [], []
    print(f"{'kernel':<14} {'provider':<10} {'pairs':>6} {'µs':>10} {'[q20, q80]':>20} {'÷ref':>6}")
    for kernel in ("dpo_loss", "pair_dpo_loss"):
        for pairs in cfg.pairs:
            base = None
            for provider in ("reference", "ours"):
                und, gen, leaves = make_logps(pairs, cfg.device)
                fn = CASES[(kernel, provider)]
                t = utils.do_bench(
                    lambda fn=fn, und=und, gen=gen: fn(und, gen, cfg.loss_type).backward(),
                    warmup=cfg.warmup, rep=cfg.reps, device=cfg.device,
                    setup=lambda leaves=leaves: [setattr(x, "grad", None) for x in leaves],
                )
                base = base or t[0]
                print(f"{kernel:<14} {provider:<10} {pairs:>6} {t[0] * 1e6:>10.1f} "
                      f"{f'[{t[1] * 1e6:.1f}, {t[2] * 1e6:.1f}]':>20} {t[0] / base:>6.2f}")
                config = {"pairs": pairs, "loss_type": cfg.loss_type, "beta": BETA, "dtype": "fp32",
                          "device": cfg.device, "threads": threads, "reps": cfg.reps}
                rows.append(utils.make_row(
                    kernel_name=kernel, provider=provider, metric="time", unit="s", x_name="pairs", x_value=pairs,
                    y=t, config=config, device=cfg.device, dtype="fp32", stamps=stamps,
                ))
                results.append({"kernel": kernel, "provider": provider, "pairs": pairs, "time": list(t)})
    if cfg.out:
        print(f"appended {len(rows)} rows to {utils.append_rows(cfg.out, rows)}")
    return results


if __name__ == "__main__":
    main()
