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

from bench import utils


def rows_of(run_dir: Path, wall_s: float | None, note: str) -> list[dict]:
    summary = json.loads((run_dir / "summary.json").read_text())["rounds"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe = {"train_records": cfg["world"]["train_records"], "heldout_records": cfg["world"]["heldout_records"],
              "curation": {k: cfg["curation"][k] for k in ("images_per_prompt", "steps", "guidance_scale",
                                                           "noise_temperature")},
              "train": {k: cfg["train"][k] for k in ("beta", "rpo_alpha", "lr", "batch_size", "epochs")},
              "eval": cfg["eval"], "seed": cfg["run"]["seed"]}
    stamps = utils.run_stamps("cpu")
    rows = []
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
            rows.append(utils.make_row(kernel_name="demo", provider=f"round {r['round']}", metric=key,
                                       unit="fraction", x_name="round", x_value=r["round"], y=(m, m - s, m + s),
                                       config=extra, device="cpu", dtype="fp32", stamps=stamps))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="runs/demo")
    ap.add_argument("--wall-s", type=float, default=None, help="the run's wall time, if measured")
    ap.add_argument("--note", default="", help="what kind of run (e.g. fresh clone)")
    ap.add_argument("--out", default=str(utils.RESULTS_DIR / "demo.csv"))
    args = ap.parse_args(argv)
    rows = rows_of(Path(args.run_dir), args.wall_s, args.note)
    print(f"appended {len(rows)} rows to {utils.append_rows(args.out, rows)}")
    return rows


if __name__ == "__main__":
    main()
