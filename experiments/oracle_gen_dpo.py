"""Can Pair-DPO's generation term move the judge's score at all on this base? Builds generation pairs from a
finished round's candidates in two ways, trains the generation term alone from the same model on each, and measures
the held-out ``gen`` (the Table 4 protocol's judge on generated images) before and after, in one run:

    self     the round's own pairs: best vs worst by the model's self-VQA (what self-play trains on)
    judge    an oracle: best vs worst by the judge itself (an upper bound on what any scorer could pick)

Both use round 1's rule (best ≠ worst, best above ``--threshold``). Training: the masked-token log-likelihood of each
image at Show-o's cosine mask ratio (chosen and rejected share the mask), ``--mask-samples`` masks per pair averaged
inside the DPO term, AdamW, ``--epochs`` over the pairs. If even the judge's pairs leave ``gen`` where it was, the
scorer is not the only thing between this base and the method's effect.

    python -m experiments.oracle_gen_dpo runs/demo/round-1 [--model hermesflow_fast/world/base] [--beta 0.2 --lr 1e-4]

Rows append to ``bench/results/oracle_gen_dpo.csv`` (per source: gen before and after, the judge's accuracy on the
pairs' chosen and rejected images, the number of pairs), with the machine, the settings and the commit.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

import torch

from experiments import BENCH_DIR
from experiments.selfvqa_vs_judge import round_records
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.data.text import prompt_ids
from hermesflow_fast.ops.dpo import dpo_losses
from hermesflow_fast.selfplay.diagnose import judge_grids
from hermesflow_fast.selfplay.pair_rules import self_play_pair
from hermesflow_fast.world import make_records
from hermesflow_fast.world.evaluate import evaluate
from hermesflow_fast.world.pretrain import mask_slots, target_logprobs
from hermesflow_fast.world.shipped import load_base


def judged_candidates(wm, round_dir: Path, seed: int) -> list[dict]:
    """Per record of the round: prompt, candidate grids, self-VQA accuracy and the judge's accuracy per grid."""
    cands = [json.loads(x) for x in (round_dir / "gen_candidates.jsonl").read_text().splitlines()]
    selfs = {d["id"]: d["accuracy"] for d in map(json.loads, (round_dir / "gen_scores.jsonl").read_text().splitlines())}
    recs = round_records(cands, seed)
    right = judge_grids(wm.image_tokenizer, torch.tensor([g for c in cands for g in c["images"]]),
                        [recs[c["id"]].questions for c in cands for _ in c["images"]])  # batched decode
    out, k = [], 0
    for c in cands:
        r, m = recs[c["id"]], len(c["images"])
        out.append({"id": r.id, "prompt": r.prompt, "images": c["images"], "self": selfs[r.id],
                    "judge": [sum(x) / len(x) for x in right[k:k + m]]})
        k += m
    return out


def make_pairs(cands: list[dict], by: str, threshold: float) -> tuple[list[dict], Counter]:
    drops: Counter = Counter()
    pairs = []
    for c in cands:
        pair = self_play_pair(list(range(len(c["images"]))), c[by], None, threshold, drops)
        if pair is not None:
            w, lo = pair[0].item, pair[1].item
            pairs.append({"prompt": c["prompt"], "chosen": c["images"][w], "rejected": c["images"][lo],
                          "judge": (c["judge"][w], c["judge"][lo])})
    return pairs, drops


def train_gen_dpo(wm, pairs: list[dict], beta: float, lr: float, epochs: int, batch: int, mask_samples: int,
                  seed: int, rpo_alpha: float = 0.0) -> int:
    """Generation-term DPO in place on ``wm.model`` (reference = a frozen copy), plus ``rpo_alpha`` × the chosen
    images' masked-token NLL per token (TRL's ``rpo_alpha``); returns the number of steps."""
    policy = wm.model
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train().requires_grad_(True)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    tok, lay, k = wm.text_tokenizer, wm.layout, mask_samples

    def seq_logps(model, texts, codes, masked):
        lp, ok = target_logprobs(model, lay.t2i(texts, codes, masked))["image"]
        return (lp * ok).sum(1), ok.sum(1)

    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(pairs), generator=g).tolist()
        for i in range(0, len(order), batch):
            b = [pairs[j] for j in order[i:i + batch]]
            texts = [prompt_ids(tok, p["prompt"]) for p in b] * k
            codes = torch.cat([torch.tensor([p["chosen"] for p in b]).repeat(k, 1),
                               torch.tensor([p["rejected"] for p in b]).repeat(k, 1)])
            masked = mask_slots(len(texts), codes.shape[1], g)
            masked = torch.cat([masked, masked])  # chosen and rejected share each mask
            lp, count = seq_logps(policy, texts + texts, codes, masked)
            pw, pl = lp.chunk(2)
            nll = -(pw.sum() / count[:len(texts)].sum())  # the chosen images' NLL per masked token
            with torch.no_grad():
                rw, rl = seq_logps(reference, texts + texts, codes, masked)[0].chunk(2)
            pw, pl, rw, rl = (t.view(k, len(b)).mean(0) for t in (pw, pl, rw, rl))  # the margin, averaged over masks
            loss = dpo_losses(pw, pl, rw, rl, beta=beta).mean() + rpo_alpha * nll
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            steps += 1
    policy.eval().requires_grad_(False)
    return steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.oracle_gen_dpo", description=__doc__.split("\n\n")[0])
    ap.add_argument("round_dir", help="a finished round folder (gen_candidates.jsonl, gen_scores.jsonl)")
    ap.add_argument("--model", default=None, help="the model that curated it (default: the shipped base)")
    ap.add_argument("--sources", default="self,judge", help="comma-separated: self, judge")
    ap.add_argument("--beta", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mask-samples", type=int, default=1, help="masks per pair, averaged inside the DPO term")
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--rpo-alpha", type=float, default=0.0,
                    help="weight of the chosen images' NLL per token added to the DPO term (TRL's rpo_alpha)")
    ap.add_argument("--heldout", type=int, default=128)
    ap.add_argument("--eval-images", type=int, default=2, help="generated images per held-out prompt")
    ap.add_argument("--seed", type=int, default=0, help="world.seed of the run")
    ap.add_argument("--threads", type=int, default=None)
    hb.add_output_args(ap, "oracle_gen_dpo", BENCH_DIR)
    args = ap.parse_args(argv)
    threads = hb.set_threads(args.threads)
    rec = hb.Recorder(hb.output_path(args, "oracle_gen_dpo", BENCH_DIR), "cpu", kernel_name="oracle_gen_dpo",
                      x_name="pairs", unit="fraction")
    t0 = time.perf_counter()
    wm = load_base(args.model)
    held = make_records(args.heldout, args.seed, "heldout")

    def gen_score(model_wm) -> float:
        return evaluate(model_wm, held, images_per_prompt=args.eval_images, steps=12, guidance_scale=3.0,
                        seed=args.seed).gen

    cands = judged_candidates(wm, Path(args.round_dir), args.seed)
    before = gen_score(wm)
    print(f"{len(cands)} records; held-out gen before training {before:.3f} ({args.heldout} records × "
          f"{args.eval_images} images)")
    out: dict = {"gen_before": before, "sources": {}}
    for source in args.sources.split(","):
        pairs, drops = make_pairs(cands, source, args.threshold)
        trained = load_base(args.model)
        steps = train_gen_dpo(trained, pairs, args.beta, args.lr, args.epochs, args.batch, args.mask_samples,
                              args.seed, args.rpo_alpha)
        after = gen_score(trained)
        jw = sum(p["judge"][0] for p in pairs) / max(1, len(pairs))
        jl = sum(p["judge"][1] for p in pairs) / max(1, len(pairs))
        out["sources"][source] = {"pairs": len(pairs), "steps": steps, "gen_after": after, "judge_chosen": jw,
                                  "judge_rejected": jl, "dropped": dict(drops)}
        print(f"{source:>6}: {len(pairs)} pairs (judge: chosen {jw:.3f}, rejected {jl:.3f}), {steps} steps → "
              f"gen {before:.3f} → {after:.3f} ({after - before:+.3f})")
    print(f"{time.perf_counter() - t0:.0f} s")
    if rec.path:
        config = {"round_dir": str(args.round_dir), "model": args.model or "shipped base", "beta": args.beta,
                  "lr": args.lr, "epochs": args.epochs, "batch": args.batch, "mask_samples": args.mask_samples,
                  "threshold": args.threshold, "rpo_alpha": args.rpo_alpha, "heldout": args.heldout,
                  "eval_images": args.eval_images, "records": len(cands), "threads": threads}
        rec.add(provider="base", metric="gen", x_value=0, y=(before,), config=config)
        for source, v in out["sources"].items():
            for metric in ("gen_after", "judge_chosen", "judge_rejected"):
                rec.add(provider=source, metric=metric, x_value=v["pairs"], y=(v[metric],),
                        config={**config, "steps": v["steps"]})
        rec.done()
    return out


if __name__ == "__main__":
    main()
