"""Which sampler gives self-play something to pick from? For each MaskGIT setting (steps, guidance g, noise τ₀), M
images per held-out prompt from a world base, read by the judge: pass@1 (a sample fully right), pass@M (the best of
M fully right), pass@M − pass@1 (the headroom best-of-M can find) per category, and the mean number of objects
drawn beyond the prompt's (overgeneration).

    python -m experiments.sampler_headroom [--model hermesflow_fast/world/base] [--records 120] [--images 6]
        [--setting 16:3.0:1.0 --setting 16:0.0:30.0 ...]      # steps:guidance:noise_temperature

Rows append to ``bench/results/sampler_headroom.csv``: per setting and category pass@1 (y50) with pass@M in the
config, the machine and the commit.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from experiments import BENCH_DIR
from hermesflow_fast.benchmarks import harness as hb
from hermesflow_fast.data.text import prompt_ids
from hermesflow_fast.model.generate import generate_images
from hermesflow_fast.world import make_records
from hermesflow_fast.world.judge import JUDGE
from hermesflow_fast.world.shipped import load_base

DEFAULT_SETTINGS = ("12:3.0:1.0", "16:1.0:1.0", "16:0.0:1.0", "16:0.0:30.0")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.sampler_headroom", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="world base folder (default: the shipped base)")
    ap.add_argument("--records", type=int, default=120, help="held-out records (every category alike)")
    ap.add_argument("--images", type=int, default=6, help="images per prompt (M)")
    ap.add_argument("--setting", action="append", default=None, metavar="STEPS:G:TAU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    hb.add_output_args(ap, "sampler_headroom", BENCH_DIR)
    args = ap.parse_args(argv)
    threads = hb.set_threads(args.threads)
    rec = hb.Recorder(hb.output_path(args, "sampler_headroom", BENCH_DIR), "cpu", kernel_name="sampler_headroom",
                      metric="pass@1", unit="fraction", x_name="category")
    wm = load_base(args.model)
    recs = make_records(args.records, args.seed, "heldout")
    texts = [prompt_ids(wm.text_tokenizer, r.prompt) for r in recs]
    M, results = args.images, {}
    for setting in args.setting or DEFAULT_SETTINGS:
        steps, g, tau = setting.split(":")
        t0 = time.perf_counter()
        with torch.no_grad():
            codes = generate_images(wm.model.eval(), wm.layout, texts, wm.num_image_tokens, M, int(steps), float(g),
                                    float(tau), generator=torch.Generator().manual_seed(args.seed))
        imgs = wm.image_tokenizer.decode(codes)
        per: dict[str, list[tuple[float, bool]]] = defaultdict(list)
        extra: list[int] = []
        for i, r in enumerate(recs):
            right = []
            for k in range(M):
                dets = JUDGE.detect(imgs[i * M + k])
                extra.append(len(dets) - len(r.scene.objects))
                right.append(all(JUDGE.answer_detections(dets, q) == q.answer for q in r.questions))
            per[r.category].append((sum(right) / M, any(right)))
        per["all"] = [x for c in list(per) for x in per[c]]
        out = {c: (sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v), len(v)) for c, v in per.items()}
        results[setting] = out
        line = " ".join(f"{c[:8]} {p1:.2f}/{pm:.2f}" for c, (p1, pm, _) in out.items())
        print(f"steps {steps} g {g} τ {tau}: pass@1/pass@{M} {line}; extra objects {sum(extra) / len(extra):+.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for c, (p1, pm, n) in out.items():
            config = {"steps": int(steps), "guidance": float(g), "noise_temperature": float(tau), "category": c,
                      "records": n, "images": M, f"pass@{M}": round(pm, 4), "headroom": round(pm - p1, 4),
                      "extra_objects": round(sum(extra) / len(extra), 3), "model": args.model or "shipped base",
                      "seed": args.seed, "threads": threads}
            rec.add(provider=setting, x_value=c, y=(p1,), config=config)
    rec.done()
    return results


if __name__ == "__main__":
    main()
