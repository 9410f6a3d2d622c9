"""Does the model's self-VQA on its own generated images agree with the judge? Reads a finished round's
``gen_candidates.jsonl`` and answers every record's questions about every candidate twice: the model (greedy, as
``gen_scores``) and the world's judge on the decoded image (the evaluation's ``gen``). Per question category: both
accuracies, how often they agree, their correlation; and the judge's accuracy on the images self-VQA picked as winner
and loser. Self-play can only raise ``gen`` if self-VQA ranks images the way the judge does.

    python -m experiments.selfvqa_vs_judge runs/demo/round-1 [--model hermesflow_fast/world/base] [--records 60]

Rows append to ``bench/results/selfvqa_judge.csv`` (per category: self_vqa, judge, agree, corr; and the judge's
accuracy on self-VQA's winners and losers), with the machine and commit.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from experiments import BENCH_DIR
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.data.text import und_prompt_ids
from hermesflow_fast.model.generate import generate_text
from hermesflow_fast.selfplay.diagnose import world_records
from hermesflow_fast.world.judge import JUDGE
from hermesflow_fast.world.scoring import answer_match
from hermesflow_fast.world.shipped import load_base


def round_records(cands: list[dict], seed: int) -> dict:
    """The world's train records a round's candidates name ("train-000123"), by id."""
    return world_records([c["id"] for c in cands], seed)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.selfvqa_vs_judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("round_dir", help="a finished round folder (gen_candidates.jsonl)")
    ap.add_argument("--model", default=None, help="the model that curated it (default: the shipped base)")
    ap.add_argument("--records", type=int, default=60, help="first N records of the round")
    ap.add_argument("--seed", type=int, default=0, help="world.seed of the run")
    hb.add_output_args(ap, "selfvqa_judge", BENCH_DIR)
    args = ap.parse_args(argv)
    wm = load_base(args.model)
    cands = [json.loads(line) for line in (Path(args.round_dir) / "gen_candidates.jsonl").read_text().splitlines()]
    cands = cands[: args.records]
    recs = round_records(cands, args.seed)
    codes, prompts, meta = [], [], []
    for c in cands:
        r = recs[c["id"]]
        grids = torch.tensor(c["images"])
        with torch.no_grad():
            pixels = wm.image_tokenizer.decode(grids)
        for m, img in enumerate(pixels):
            for q, said in zip(r.questions, JUDGE.answers(img, r.questions)):  # the judge reads (3, H, W) in [−1, 1]
                codes.append(grids[m])
                prompts.append(und_prompt_ids(wm.text_tokenizer, q.prompt))
                meta.append((c["id"], m, q, said == q.answer))
    answers = generate_text(wm.model, wm.layout, torch.stack(codes), prompts, max_new_tokens=4)
    by_cat = defaultdict(lambda: ([], []))
    per_image = defaultdict(lambda: ([], []))
    for (rid, m, q, judge_ok), ids in zip(meta, answers):
        said = answer_match(wm.text_tokenizer.decode(ids, skip_special_tokens=True).strip(), q.choices)
        for bucket in (by_cat[q.category], by_cat["all"]):
            bucket[0].append(int(said == q.answer))
            bucket[1].append(int(judge_ok))
        per_image[(rid, m)][0].append(int(said == q.answer))
        per_image[(rid, m)][1].append(int(judge_ok))
    out: dict = {"categories": {}}
    for cat, (s, j) in by_cat.items():
        s, j = np.array(s), np.array(j)
        corr = float(np.corrcoef(s, j)[0, 1]) if s.std() > 0 and j.std() > 0 else float("nan")
        out["categories"][cat] = {"questions": int(s.size), "self": float(s.mean()), "judge": float(j.mean()),
                                  "agree": float((s == j).mean()), "corr": corr}
    win, lose = [], []
    for c in cands:
        scores = [np.mean(per_image[(c["id"], m)][0]) for m in range(len(c["images"]))]
        judged = [np.mean(per_image[(c["id"], m)][1]) for m in range(len(c["images"]))]
        w, lo = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[w] > scores[lo]:
            win.append(judged[w])
            lose.append(judged[lo])
    out["judge_of_winners"], out["judge_of_losers"], out["records_with_a_pair"] = (
        float(np.mean(win)), float(np.mean(lose)), len(win))
    print("\n".join(hb.align(["category", "questions", "self-VQA", "judge", "agree", "corr"], [
        [cat, str(v["questions"]), *(f"{v[k]:.3f}" for k in ("self", "judge", "agree", "corr"))]
        for cat, v in out["categories"].items()], left=(0,))))
    print(f"judge's accuracy on self-VQA's winners {out['judge_of_winners']:.3f}, on its losers "
          f"{out['judge_of_losers']:.3f} ({len(win)} records)")
    out_csv = hb.output_path(args, "selfvqa_judge", BENCH_DIR)
    if out_csv:
        rec = hb.Recorder(out_csv, "cpu", kernel_name="selfvqa_vs_judge", x_name="records", x_value=len(cands),
                          unit="fraction")
        images = sum(len(c["images"]) for c in cands)
        config = {"round_dir": str(args.round_dir), "model": args.model or "shipped base", "records": len(cands),
                  "images": images, "seed": args.seed}
        for cat, v in out["categories"].items():
            for metric in ("self", "judge", "agree", "corr"):
                rec.add(provider=cat, metric=metric, y=(v[metric],), config={**config, "questions": v["questions"]})
        for side in ("winners", "losers"):
            rec.add(provider="pairs", metric=f"judge_of_{side}", y=(out[f"judge_of_{side}"],),
                    config={**config, "records_with_a_pair": len(win)})
        rec.done()
    return out


if __name__ == "__main__":
    main()
