"""What do self-VQA's pairs add? One self-play round from the shipped base, three ways that differ only in the
generation pairs, on the real pipeline (``run_selfplay``: the same curation, trainer, budget, seeds and evaluation):

    self     the round's own pairs: best vs worst of the M candidates by the model's self-VQA (HermesFlow)
    random   two of the same M candidates drawn at random, for the same records as ``self`` (no ranking at all)
    judge    best vs worst by the world's judge on the decoded candidates (an oracle), ties and a best at or
             below ``curation.vqa_threshold`` dropped as self-VQA's are

The understanding pairs (captions scored against the true caption) are the same in all three arms, so the
difference between arms is what the ranking of generated images is worth. Per training seed: the round is curated
once (``--stop-after pairs``), copied per arm, its ``pairs.jsonl`` rewritten, and the run resumed to train and
evaluate (held-out und / gen, mean ± std over ``eval.seeds`` evaluation seeds).

    python -m experiments.selfplay_ablation [--seeds 0,1,2] [--work runs/ablation] [dotted overrides of the recipe]

Rows append to ``bench/results/selfplay_ablation.csv``: per arm and seed the held-out gen (y50 = mean over
evaluation seeds, y20/y80 = mean ∓ std) and und, the base's row, the pairs, machine and commit.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from experiments import BENCH_DIR
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.selfplay.config import SelfPlayConfig
from hermesflow_fast.selfplay.pair_rules import first_round_pair
from hermesflow_fast.selfplay.rounds import run_selfplay
from hermesflow_fast.train.config import load_config

RECIPE = BENCH_DIR.parent / "configs" / "selfplay-shapes.yaml"
ARMS = ("self", "random", "judge")


def rewrite_pairs(round_dir: Path, arm: str, wm, world_seed: int, seed: int, threshold: float) -> dict:
    """Replace the generation side of ``round_dir/pairs.jsonl`` for ``arm`` (the file stays in the round's format);
    the judge reads the candidates against the records of ``world_seed`` (the run's world.seed), ``seed`` draws the
    random arm's pairs. Returns the judge's mean score of the chosen and rejected images and the pair count."""
    from experiments.oracle_gen_dpo import judged_candidates

    cands = {c["id"]: c for c in judged_candidates(wm, round_dir, world_seed)}
    rng = random.Random(seed)
    lines, judged = [], []
    for n, line in enumerate((round_dir / "pairs.jsonl").read_text().splitlines(), 1):
        p = json.loads(line)
        c = cands.get(p["id"])
        if c is not None and c["prompt"] != p["prompt"]:
            raise SystemExit(f"{round_dir / 'pairs.jsonl'}:{n}: record {p['id']!r} is {p['prompt']!r} in the round "
                             f"but {c['prompt']!r} in world seed {world_seed}: not the round's world")
        if arm != "self" and c is not None:
            idx = list(range(len(c["images"])))
            gen = p.pop("gen", None)
            w = lo = None
            if arm == "random" and gen is not None:
                w, lo = rng.sample(idx, 2)
            elif arm == "judge" and (pair := first_round_pair(idx, c["judge"], threshold)) is not None:
                w, lo = pair[0].item, pair[1].item  # self-play's round-1 rule, on the judge's scores
            if w is not None:
                p["gen"] = {"chosen": c["images"][w], "rejected": c["images"][lo],
                            "scores": [c["self"][w], c["self"][lo]]}
        if "gen" in p and c is not None:
            ch, rj = p["gen"]["chosen"], p["gen"]["rejected"]
            judged.append((c["judge"][c["images"].index(ch)], c["judge"][c["images"].index(rj)]))
        if "gen" in p or "und" in p:
            lines.append(json.dumps(p, separators=(",", ":")))
    (round_dir / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    n = max(1, len(judged))
    return {"gen_pairs": len(judged), "judge_chosen": sum(a for a, _ in judged) / n,
            "judge_rejected": sum(b for _, b in judged) / n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.selfplay_ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(RECIPE), help="self-play recipe (default: the demo's)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (run.seed of each round)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--work", default="runs/ablation", help="folder for the runs (one per seed and arm)")
    ap.add_argument("--threads", type=int, default=2)
    hb.add_output_args(ap, "selfplay_ablation", BENCH_DIR)
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the recipe")
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    if any(a not in ARMS for a in arms):
        ap.error(f"--arms: each of {ARMS}")
    threads = hb.set_threads(args.threads)
    rec = hb.Recorder(hb.output_path(args, "selfplay_ablation", BENCH_DIR), "cpu", kernel_name="selfplay_ablation",
                      metric="gen", unit="fraction", x_name="train_seed")
    work = Path(args.work)
    results: dict[str, dict] = {}
    quiet = lambda m: None  # noqa: E731
    from hermesflow_fast.world.shipped import load_base

    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = load_config(args.config, [*args.overrides, f"run.seed={seed}", "log.progress=false"],
                          schema=SelfPlayConfig)
        t0 = time.perf_counter()
        cur = work / f"seed{seed}-curated"
        if not (cur / "round-1" / "pairs.done").is_file():
            shutil.rmtree(cur, ignore_errors=True)
            base = run_selfplay(cfg, cur, 1, log=quiet, stop_after="pairs")[0]
        else:
            base = json.loads((cur / "round-0" / "eval.json").read_text())
        results[f"base/{seed}"] = {"arm": "base", "seed": seed, **base, "curate_s": time.perf_counter() - t0}
        print(f"seed {seed}: base und {base['und']:.3f} gen {base['gen']:.3f} ± {base.get('gen_std', 0):.3f}",
              flush=True)
        wm = load_base(cfg.world.base)
        for arm in arms:
            run = work / f"seed{seed}-{arm}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(cur, run)
            info = rewrite_pairs(run / "round-1", arm, wm, cfg.world.seed, seed, cfg.curation.vqa_threshold)
            t1 = time.perf_counter()
            r1 = run_selfplay(cfg, run, 1, resume=True, log=quiet)[1]
            results[f"{arm}/{seed}"] = {"arm": arm, "seed": seed, **r1, **info,
                                        "train_eval_s": time.perf_counter() - t1}
            print(f"seed {seed} {arm:6s}: und {r1['und']:.3f} gen {r1['gen']:.3f} ± {r1.get('gen_std', 0):.3f} "
                  f"({info['gen_pairs']} gen pairs, judge {info['judge_chosen']:.2f} vs {info['judge_rejected']:.2f})",
                  flush=True)
    if rec.path:
        for r in results.values():
            extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                     if k in ("und", "und_std", "gen_std", "gap", "gen_pairs", "judge_chosen", "judge_rejected",
                              "records", "seeds", "curate_s", "train_eval_s")}
            g, s = r["gen"], r.get("gen_std", 0.0)
            config = {"recipe": str(Path(args.config).name), "overrides": args.overrides, "train_seed": r["seed"],
                      "threads": threads, **extra}
            rec.add(provider=r["arm"], x_value=r["seed"], y=(g, g - s, g + s), config=config)
        rec.done()
    return results


if __name__ == "__main__":
    main()
