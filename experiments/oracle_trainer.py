"""Does the Pair-DPO trainer's generation term train what the sampler draws? Two arms from the same world base, the
same number S of optimizer steps, the same lr, batch size, warm-up + cosine schedule, AdamW, clipping and prompt
dropout, each followed by the held-out generation score (``world.evaluate``, the judge on generated images):

    pretrain   S steps of the world's own t2i pretraining loss (``world.pretrain.build_batch`` rows, the t2i term
               only: mean CE over Show-o's cosine-masked slots of ground-truth renders, fresh masks every step)
    trainer    S steps of the REAL ``Trainer`` (train/trainer.py) on generation pairs, gen side only: chosen = the
               ground-truth render's codes, rejected = one of the model's own samples for the prompt
               (``--pairs gt``), or the judge's best vs worst of a finished round's candidates (``--pairs judge
               --round-dir R``); tiny β + ``rpo_alpha`` makes it plain fine-tuning on the chosen images
               through the trainer's estimator, once per ``--estimator M:LOGP[:LO-HI]`` (train.gen_masks,
               train.gen_logp, train.gen_mask_ratio)

Why the t2i term alone and not the full mix: the trainer arm trains only the generation side, so the matching
baseline is the pretraining loss of that side on the same records; the caption / VQA terms would move shared weights
for reasons of their own. If ``trainer`` raises gen at least as much as ``pretrain``, the trainer's generation term
trains what the sampler draws; if not, the estimator (masks, per-slot normalisation, β), not the pairs, is what to fix.

    python -m experiments.oracle_trainer --model hermesflow_fast/world/base --steps 60 \\
        --estimator 1:sum --estimator 4:mean

Rows append to ``bench/results/oracle_trainer.csv``: per arm the held-out gen (y50 = mean over evaluation seeds,
y20/y80 = min/max), x = optimizer steps, with the settings, machine and commit.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from experiments import BENCH_DIR
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.data.batching import TokenizedPair
from hermesflow_fast.data.text import prompt_ids
from hermesflow_fast.model.generate import generate_images
from hermesflow_fast.selfplay.stages import curation_generator
from hermesflow_fast.train.config import TrainConfig
from hermesflow_fast.train.dataset import TrainData
from hermesflow_fast.train.optim import build_optimizer, resolve_warmup, warmup_cosine
from hermesflow_fast.train.trainer import Trainer
from hermesflow_fast.world import make_records
from hermesflow_fast.world.evaluate import encode_records, evaluate
from hermesflow_fast.world.pretrain import PretrainConfig, build_batch, target_logprobs, world_data
from hermesflow_fast.world.shipped import BASE_DIR, load_base


def gt_pairs(wm, records, seed: int, sample_steps: int, guidance: float,
             noise_temperature: float = 1.0) -> list[TokenizedPair]:
    """chosen = the render's codes, rejected = one sample of the model for the record's prompt (seeded per record)."""
    tok, lay, N = wm.text_tokenizer, wm.layout, wm.num_image_tokens
    real = encode_records(wm, records)
    texts = [prompt_ids(tok, r.prompt)[: lay.t2i_text_len - 3] for r in records]
    gens = [curation_generator(r.id, 0, "oracle-rejected", seed) for r in records]
    with torch.no_grad():
        own = generate_images(wm.model.eval(), lay, texts, N, steps=sample_steps, guidance_scale=guidance,
                              noise_temperature=noise_temperature,
                              generator=gens).cpu()
    return [TokenizedPair(r.id, t, [], None, None, None, real[i], own[i])
            for i, (r, t) in enumerate(zip(records, texts))]


def judge_pairs(wm, round_dir: Path, seed: int, threshold: float) -> tuple[list[TokenizedPair], dict]:
    """The judge's best vs worst candidate of each record of a finished round (``oracle_gen_dpo``'s rule)."""
    from experiments.oracle_gen_dpo import judged_candidates, make_pairs

    pairs, drops = make_pairs(judged_candidates(wm, Path(round_dir), seed), "judge", threshold)
    tok, cut = wm.text_tokenizer, wm.layout.t2i_text_len - 3
    out = [TokenizedPair(f"judge-{i:05d}", prompt_ids(tok, p["prompt"])[:cut], [], None, None, None,
                         torch.tensor(p["chosen"]), torch.tensor(p["rejected"])) for i, p in enumerate(pairs)]
    info = {"judge_chosen": sum(p["judge"][0] for p in pairs) / max(1, len(pairs)),
            "judge_rejected": sum(p["judge"][1] for p in pairs) / max(1, len(pairs)), "dropped": dict(drops)}
    return out, info


def train_config(args, estimator: str, run_dir: Path, t2i_text_len: int) -> TrainConfig:
    masks, logp, *ratio = estimator.split(":")
    lo, hi = (float(x) for x in ratio[0].split("-")) if ratio else (0.0, 1.0)
    cfg = TrainConfig()
    cfg.run.seed, cfg.run.run_dir = args.seed, str(run_dir)
    cfg.model.init_from, cfg.model.compile = str(args.model or BASE_DIR), False
    cfg.data.t2i_text_len, cfg.data.token_budget = t2i_text_len, args.token_budget
    t = cfg.train
    t.beta, t.rpo_alpha, t.lr, t.batch_size, t.max_steps = args.beta, args.rpo_alpha, args.lr, args.batch, args.steps
    t.und_coeff, t.gen_coeff, t.text_dropout, t.warmup_ratio = 0.0, 1.0, args.text_dropout, args.warmup_ratio
    t.gen_masks, t.gen_logp, t.gen_mask_ratio = int(masks), logp, [lo, hi]
    cfg.checkpoint.every, cfg.checkpoint.keep, cfg.log.progress = 10**9, 1, False
    return cfg


def pretrain_arm(wm, data, t: TrainConfig, steps: int, seed: int, text_dropout: float) -> list[float]:
    """``steps`` steps of the t2i pretraining loss in place on ``wm.model`` with the trainer's optimizer and
    schedule (same lr, batch, warm-up, cosine, clipping); returns the loss per step."""
    model = wm.model.train().requires_grad_(True)
    opt = build_optimizer(model, t.train)
    sched = warmup_cosine(opt, resolve_warmup(t.train, steps), steps)
    pc = PretrainConfig(batch_t2i=t.train.batch_size, batch_und=1, cond_dropout=text_dropout, seed=seed)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        lp, ok = target_logprobs(model, build_batch(wm, data, pc, g)["t2i"])["image"]
        loss = -(lp.sum() / ok.sum().clamp_min(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.train.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval().requires_grad_(False)
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.oracle_trainer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="world base folder (default: the shipped base)")
    ap.add_argument("--pairs", choices=("gt", "judge"), default="gt")
    ap.add_argument("--round-dir", default=None, help="with --pairs judge: a finished round folder")
    ap.add_argument("--threshold", type=float, default=0.6, help="--pairs judge: best must score above it")
    ap.add_argument("--records", type=int, default=256, help="train records for the pairs and the baseline")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each arm")
    ap.add_argument("--batch", type=int, default=16, help="pairs (trainer) = t2i rows (pretrain) per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--rpo-alpha", type=float, default=1.0)
    ap.add_argument("--text-dropout", type=float, default=0.1, help="prompt dropout of both arms (pretraining's)")
    ap.add_argument("--estimator", action="append", default=None,
                    help="M:LOGP[:LO-HI] = train.gen_masks, train.gen_logp[, train.gen_mask_ratio]; repeatable "
                         "(default 1:sum, Show-o's one summed mask)")
    ap.add_argument("--arms", default="pretrain,trainer", help="comma-separated: pretrain, trainer")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--eval-seeds", default="0,1", help="comma-separated evaluation seeds (1 image per prompt each)")
    ap.add_argument("--sample-steps", type=int, default=12, help="MaskGIT steps of the rejected samples and the eval")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--noise-temperature", type=float, default=1.0, help="MaskGIT τ₀ of the rejected samples and "
                                                                          "the eval (the demo's recipe: 30, g 0)")
    ap.add_argument("--seed", type=int, default=0, help="world seed (records) and training seed")
    ap.add_argument("--threads", type=int, default=1)
    hb.add_output_args(ap, "oracle_trainer", BENCH_DIR)
    args = ap.parse_args(argv)
    if args.pairs == "judge" and not args.round_dir:
        ap.error("--pairs judge needs --round-dir")
    threads = hb.set_threads(args.threads)
    rec = hb.Recorder(hb.output_path(args, "oracle_trainer", BENCH_DIR), "cpu", kernel_name="oracle_trainer",
                      metric="gen", unit="fraction", x_name="steps")
    t0 = time.perf_counter()
    base = load_base(args.model)
    held = make_records(args.heldout, args.seed, "heldout")
    seeds = [int(s) for s in args.eval_seeds.split(",")]

    def gen_scores(wm) -> list[float]:
        return [evaluate(wm, held, steps=args.sample_steps, guidance_scale=args.guidance,
                         noise_temperature=args.noise_temperature, seed=s).gen for s in seeds]

    records = make_records(args.records, args.seed, "train")
    results: dict[str, dict] = {"base": {"gen": gen_scores(base), "steps": 0}}
    say = print
    say(f"base: gen {_fmt(results['base']['gen'])} ({args.heldout} held-out records × {len(seeds)} seeds)")
    arms = args.arms.split(",")
    if "pretrain" in arms:
        wm = load_base(args.model)
        cfg = train_config(args, "1:sum", Path("-"), wm.layout.t2i_text_len)
        t1 = time.perf_counter()
        data = world_data(wm.text_tokenizer, records, encode_records(wm, records))
        losses = pretrain_arm(wm, data, cfg, args.steps, args.seed, args.text_dropout)
        results["pretrain t2i"] = {"gen": gen_scores(wm), "steps": args.steps, "loss_first": losses[0],
                                   "loss_last": sum(losses[-5:]) / len(losses[-5:]),
                                   "train_s": time.perf_counter() - t1}
        say(f"pretrain t2i: gen {_fmt(results['pretrain t2i']['gen'])}, t2i loss {losses[0]:.3f} → "
            f"{results['pretrain t2i']['loss_last']:.3f}")
    if "trainer" in arms:
        if args.pairs == "gt":
            pairs, info = gt_pairs(base, records, args.seed, args.sample_steps, args.guidance,
                                   args.noise_temperature), {}
        else:
            pairs, info = judge_pairs(base, Path(args.round_dir), args.seed, args.threshold)
        for est in args.estimator or ["1:sum"]:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = train_config(args, est, Path(tmp) / "run", base.layout.t2i_text_len)
                data = TrainData(base.vocab, base.layout, pairs, f"{len(pairs)} {args.pairs} pairs",
                                 base.num_image_tokens)
                t1 = time.perf_counter()
                tr = Trainer(cfg, data=data, log=lambda m: None).setup()
                hist = tr.train()
                wm = copy.copy(base)
                wm.model = tr.policy.eval().requires_grad_(False)
            name = f"trainer {est}"
            results[name] = {"gen": gen_scores(wm), "steps": len(hist), "n_pairs": len(pairs),
                             "nll_first": hist[0]["gen/nll"], "nll_last": _tail(hist, "gen/nll"),
                             "margin_last": hist[-1]["gen/rewards/margins"], "train_s": time.perf_counter() - t1,
                             **info}
            r = results[name]
            say(f"{name}: gen {_fmt(r['gen'])}, {len(pairs)} pairs, chosen NLL/token {r['nll_first']:.3f} → "
                f"{r['nll_last']:.3f}, margin {r['margin_last']:+.3f}")
    say(f"{time.perf_counter() - t0:.0f} s")
    if rec.path:
        config = {k: getattr(args, k) for k in ("model", "pairs", "round_dir", "records", "batch", "lr", "beta",
                                                 "rpo_alpha", "text_dropout", "warmup_ratio", "heldout",
                                                 "sample_steps", "guidance", "noise_temperature", "seed")}
        config.update(model=args.model or "shipped base", eval_seeds=seeds, threads=threads,
                      image_tokens=base.num_image_tokens, codes=base.vocab.num_image_codes)
        for name, r in results.items():
            g = r["gen"]
            extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("gen",)}
            rec.add(provider=name, x_value=r["steps"], y=(sum(g) / len(g), min(g), max(g)), config={**config, **extra})
        rec.done()
    return results


def _tail(hist: list[dict], key: str) -> float:
    last = hist[-5:]
    return sum(h[key] for h in last) / len(last)


def _fmt(g: list[float]) -> str:
    return f"{sum(g) / len(g):.3f} ({', '.join(f'{x:.3f}' for x in g)})"


if __name__ == "__main__":
    main()
