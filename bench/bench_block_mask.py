"""Building FlexAttention's BlockMask for packed training rows: ``attention.block_mask_from_dense`` (the tiles read
off the dense mask) against ``torch.nn.attention.flex_attention.create_block_mask`` evaluating the OmniMask's
``mask_mod`` over the whole grid (uncompiled, its default), on the same mask, one run.

Workload: B rows of T tokens, each a packed row of 387-token sequences (Show-o's 256-px t2i / mmu length) with a
bidirectional 258-token image block in each, as the trainer packs them. One timed call = one BlockMask built.

    python -m bench.bench_block_mask                                   # CPU: 2 rows × 1k/2k/4k tokens
    python -m bench.bench_block_mask --device cuda --tokens 4096,8192,16384 --out gpu.csv
"""

from __future__ import annotations

import argparse

import torch

from bench import utils
from hermesflow_fast.model.attention import block_mask_from_dense
from hermesflow_fast.model.masks import OmniMask

CSV = utils.RESULTS_DIR / "block_mask.csv"
SEQ, IMAGE_START, IMAGE_LEN = 387, 129, 258


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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_block_mask", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--tokens", default="1024,2048,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(CSV), help="CSV to append to ('' for none)")
    cfg = ap.parse_args(argv)
    threads = utils.set_threads(cfg.threads)
    stamps = utils.run_stamps(cfg.device)
    rows = []
    for T in (int(t) for t in cfg.tokens.split(",")):
        mask = packed_mask(cfg.rows, T, cfg.device)
        fns = providers(mask, cfg.rows, T, cfg.device)
        built = {name: fn() for name, fn in fns.items()}  # same tiles, or the comparison means nothing
        for n, i in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            if tiles(built["create_block_mask"], n, i) != tiles(built["ours"], n, i):
                raise SystemExit(f"block masks differ at T={T} ({n})")
        base = None
        for name, fn in fns.items():
            t = utils.do_bench(fn, warmup=1, rep=cfg.reps, device=cfg.device)
            base = base or t[0]
            print(f"{cfg.rows} × {T:>6} tokens  {name:<18} {t[0]:9.4f} s  [{t[1]:.4f}, {t[2]:.4f}]  "
                  f"{base / t[0]:5.2f}× create_block_mask")
            rows.append(utils.make_row(kernel_name="block_mask", provider=name, metric="time", unit="s",
                                       x_name="tokens", x_value=T, y=t, device=cfg.device, dtype="bool",
                                       config={"rows": cfg.rows, "seq": SEQ, "reps": cfg.reps, "threads": threads},
                                       stamps=stamps))
    if cfg.out:
        print(f"appended {len(rows)} rows to {utils.append_rows(cfg.out, rows)}")
    return rows


if __name__ == "__main__":
    main()
