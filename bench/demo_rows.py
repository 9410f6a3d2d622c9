"""A finished self-play run (``make demo``'s ``runs/demo``) as rows of ``bench/results/demo.csv``: per round the
held-out und, gen and gap (y50 = mean over evaluation seeds, y20 / y80 = mean ∓ std), with the run's recipe
(its config.yaml), the round's pairs and judge-side diagnostics, the machine and the commit.

    make demo && python -m bench.demo_rows runs/demo [--wall-s 368] [--note "fresh clone"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from bench import BENCH_DIR
from hermesflow_fast.benchmarks import harness as hb


def rows_of(run_dir: Path, wall_s: float | None, note: str, out: Path | None = None) -> list[dict]:
    """The run's rows (appended to ``out`` when given)."""
    summary = json.loads((run_dir / "summary.json").read_text())["rounds"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe = {"train_records": cfg["world"]["train_records"], "heldout_records": cfg["world"]["heldout_records"],
              "curation": {k: cfg["curation"][k] for k in ("images_per_prompt", "steps", "guidance_scale",
                                                           "noise_temperature")},
              "train": {k: cfg["train"][k] for k in ("beta", "rpo_alpha", "lr", "batch_size", "epochs")},
              "eval": cfg["eval"], "seed": cfg["run"]["seed"]}
    rec = hb.Recorder(out, "cpu", kernel_name="demo", unit="fraction", x_name="round")
    for r in summary:
        diag = r.get("diagnostics") or {}
        allrow = (diag.get("categories") or {}).get("all", {})
        judge, gen_pairs = allrow.get("judge", {}), (diag.get("pairs") or {}).get("gen", {})
        extra = {"round": r["round"], "seeds": r.get("seeds"), "gen_by_category": r.get("gen_by_category"),
                 "candidates_judge_pass@1": judge.get("pass_at_1"), "candidates_judge_pass@M": judge.get("pass_at_m"),
                 "selfvqa_judge_pearson": allrow.get("pearson"), "gen_pairs": gen_pairs.get("kept"),
                 "gen_pairs_judge_chosen": gen_pairs.get("judge_chosen"),
                 "gen_pairs_judge_rejected": gen_pairs.get("judge_rejected"),
                 "gen_pairs_judge_prefers_chosen": gen_pairs.get("judge_prefers_chosen"),
                 "selfvqa_judge_agreement": allrow.get("agreement"),
                 "candidates_by_category": {c: {"judge_pass@1": v["judge"]["pass_at_1"],
                                                "judge_pass@M": v["judge"]["pass_at_m"], "agreement": v["agreement"]}
                                            for c, v in (diag.get("categories") or {}).items()},
                 "wall_s": wall_s, "note": note,
                 **recipe}
        for key in ("und", "gen", "gap"):
            m, s = r[key], r.get(f"{key}_std", 0.0)
            rec.add(provider=f"round {r['round']}", metric=key, x_value=r["round"], y=(m, m - s, m + s), config=extra)
    return rec.done()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_rows", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="runs/demo")
    ap.add_argument("--wall-s", type=float, default=None, help="the run's wall time, if measured")
    ap.add_argument("--note", default="", help="what kind of run (e.g. fresh clone)")
    hb.add_output_args(ap, "demo", BENCH_DIR)
    args = ap.parse_args(argv)
    return rows_of(Path(args.run_dir), args.wall_s, args.note, hb.output_path(args, "demo", BENCH_DIR))


if __name__ == "__main__":
    main()
