"""Building FlexAttention's BlockMask for packed training rows: ``attention.block_mask_from_dense`` (the tiles read
off the dense mask) against ``torch.nn.attention.flex_attention.create_block_mask`` evaluating the OmniMask's
``mask_mod`` over the whole grid (uncompiled, its default), on the same mask, one run.

Workload: B rows of T tokens, each a packed row of 387-token sequences (Show-o's 256-px t2i / mmu length) with a
bidirectional 258-token image block in each, as the trainer packs them. One timed call = one BlockMask built. Before
timing a size, both builders' tiles are compared (they must list the same blocks).

    python -m bench.bench_block_mask                                   # CPU: 2 rows × 1k/2k/4k tokens
    python -m bench.bench_block_mask --device cuda --tokens 4096,8192,16384 --out gpu.csv
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from bench import BENCH_DIR
from hermesflow_fast.benchmarks.harness import Axis, Ratio, Sweep, do_bench
from hermesflow_fast.model.attention import block_mask_from_dense
from hermesflow_fast.model.masks import OmniMask

SEQ, IMAGE_START, IMAGE_LEN = 387, 129, 258


@dataclass(frozen=True)
class Problem:
    rows: int
    tokens: int
    device: str = "cpu"


def packed_mask(B: int, T: int, device) -> OmniMask:
    """B rows of T tokens: back-to-back 387-token sequences (segments), each with a bidirectional image block."""
    pos = torch.arange(T, device=device)
    seg, at = pos // SEQ, pos % SEQ
    block = torch.where((at >= IMAGE_START) & (at < IMAGE_START + IMAGE_LEN), seg, torch.full_like(seg, -1))
    rows = lambda t: t.expand(B, T).contiguous()  # noqa: E731
    return OmniMask(torch.ones(B, T, dtype=torch.bool, device=device), rows(block),
                    torch.zeros(B, T, dtype=torch.long, device=device), rows(seg))


def providers(mask: OmniMask, B: int, T: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    mod = mask.mask_mod()
    return {
        "create_block_mask": lambda: create_block_mask(mod, B, None, T, T, device=device),
        "ours": lambda: block_mask_from_dense(mask.dense(), mod),
    }


def tiles(bm, num: str, idx: str) -> list[set[int]]:
    """Per (row, query tile): the set of key tiles listed in ``idx`` (the first ``num`` of them)."""
    n, i = getattr(bm, num).cpu(), getattr(bm, idx).cpu()
    return [set(i[r, 0, q, : n[r, 0, q]].tolist()) for r in range(n.shape[0]) for q in range(n.shape[2])]


def same_tiles(p: Problem) -> None:
    """Both builders list the same tiles at this size, or the comparison means nothing (SystemExit otherwise)."""
    built = {name: fn() for name, fn in providers(packed_mask(p.rows, p.tokens, p.device), p.rows, p.tokens,
                                                  p.device).items()}
    for n, i in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        if tiles(built["create_block_mask"], n, i) != tiles(built["ours"], n, i):
            raise SystemExit(f"block masks differ at T={p.tokens} ({n})")


def measure(p: Problem, provider: str, reps: int, warmup: int) -> dict:
    fn = providers(packed_mask(p.rows, p.tokens, p.device), p.rows, p.tokens, p.device)[provider]
    return {"time": list(do_bench(fn, warmup=warmup, rep=reps, device=p.device))}


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rows", type=int, default=2, help="packed rows (B)")


SWEEP = Sweep(
    name="block_mask", module="bench.bench_block_mask", doc=__doc__, kernel="block_mask",
    axes=[Axis("tokens", (1024, 2048, 4096), "tokens per row (T)")], providers=("create_block_mask", "ours"),
    problem_type=Problem, problem=lambda pt, cfg: Problem(cfg.rows, pt["tokens"], cfg.device), measure=measure,
    before_point=same_tiles, dtypes=("bool",), reps=(3, 3), warmup=(1, 1), options=_options,
    ratios=[Ratio("÷create_block_mask", "create_block_mask")], config=lambda r, cfg: {"rows": cfg.rows, "seq": SEQ},
    title=lambda cfg: f"BlockMask of {cfg.rows} packed rows (387-token sequences)", home=BENCH_DIR,
)
main = SWEEP.main

if __name__ == "__main__":
    main()
