"""Records per second of one full curation pass (K captions + M images + self-VQA per record) on the shipped
shapes-world base model: ours (the self-play stages: batched over records, KV-cached decoding, cond + uncond in one
batch with the text prefix cached, token grids straight into self-VQA) against a HermesFlow-style pass
(bench/hermesflow_curation.py: batch 1, no KV cache, full logits every step, PNG round trip before self-VQA) on the
same model, records and sampling settings, in one run.

    python -m bench.bench_curation                      # CPU: 32 records, the paper's 10-caption grid, M = 8
    python -m bench.bench_curation --records 8 --images 4 --out /tmp/c.csv
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import utils
from bench.hermesflow_curation import hermesflow_curation_pass
from hermesflow_fast.selfplay.journal import Journal
from hermesflow_fast.selfplay.rounds import world_curation_records
from hermesflow_fast.selfplay.stages import CurationSettings, gen_candidates, gen_scores, und_candidates
from hermesflow_fast.world import make_records
from hermesflow_fast.world.base import load_base
from hermesflow_fast.world.scoring import answer_match

CSV = utils.RESULTS_DIR / "curation.csv"


def ours_pass(wm, records, settings, tmp) -> None:
    und_candidates(wm, records, Journal(tmp / "u.jsonl"), settings, 1)
    gc = gen_candidates(wm, records, Journal(tmp / "g.jsonl"), settings, 1)
    gen_scores(wm, records, gc, Journal(tmp / "s.jsonl"), settings, answer_match)


def main(argv: list[str] | None = None) -> list[dict]:
    import tempfile
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m bench.bench_curation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="world model folder (default: the shipped base)")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--images", type=int, default=8, help="images per prompt (M)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--captions", choices=("paper", "two"), default="paper", help="the 10-caption grid or 2")
    ap.add_argument("--batch", type=int, default=32, help="ours: records per generation call")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(CSV), help="CSV to append to ('' for none)")
    cfg = ap.parse_args(argv)
    threads = utils.set_threads(cfg.threads)
    wm = load_base(cfg.base)
    recs = world_curation_records(wm, make_records(cfg.records, 123, "train"))
    grid = CurationSettings().caption_grid if cfg.captions == "paper" else ((1, 0.0), (3, 0.7))
    s = CurationSettings(caption_grid=grid, images_per_prompt=cfg.images, steps=cfg.steps, batch_size=cfg.batch)
    stamps = utils.run_stamps("cpu")
    shape = {"records": cfg.records, "captions": len(grid), "images_per_prompt": cfg.images, "steps": cfg.steps,
             "questions": sum(len(r.questions) for r in recs), "image_tokens": int(recs[0].image_codes.numel()),
             "params": sum(p.numel() for p in wm.model.parameters()), "threads": threads, "device": "cpu"}
    rows, base = [], None
    for name in ("hermesflow", "ours"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            if name == "ours":
                ours_pass(wm, recs, s, Path(tmp))
            else:
                hermesflow_curation_pass(wm, recs, s, answer_match)
            dt = time.perf_counter() - t0
        rps = cfg.records / dt
        base = base or rps
        print(f"curation {name:<11} {dt:8.1f} s  {rps:7.3f} records/s  ({rps / base:5.2f}× hermesflow)")
        rows.append(utils.make_row(kernel_name="curation_pass", provider=name, metric="records_per_s", unit="1/s",
                                   x_name="records", x_value=cfg.records, y=(rps,), config=shape, device="cpu",
                                   dtype="fp32", stamps=stamps))
    if cfg.out:
        print(f"appended {len(rows)} rows to {utils.append_rows(cfg.out, rows)}")
    return rows


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
