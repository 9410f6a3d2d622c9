"""``hermesflow selfplay`` and ``hermesflow demo`` (argument handling; torchrun re-launch for --nproc).

    hermesflow selfplay --config configs/selfplay-shapes.yaml --run-dir runs/sp [--rounds 2] [--resume] [--nproc N]
                        [--stop-after STAGE] [key=value ...]      one stage at a time: --stop-after, then --resume
    hermesflow selfplay --run-dir runs/sp --resume --allow-config-change log.every=10     a change a resume may make
    hermesflow selfplay --config configs/selfplay-real.yaml --run-dir runs/real data.records=records.jsonl \
                        data.questions=questions.json data.scorer_model=models/minilm    real data (sources.py)
    hermesflow demo [--run-dir runs/demo] [--rounds 2]          two rounds from the shipped base on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hermesflow_fast.selfplay.rounds import STAGES

__all__ = ["DEMO_RECIPE", "STAGES", "demo", "selfplay_main"]

DEMO_RECIPE = "selfplay-shapes"  # hermesflow_fast/recipes/selfplay-shapes.yaml (= configs/selfplay-shapes.yaml)


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="HermesFlow self-play rounds on the shapes world, or on "
                                                     "real data with data.records=… (selfplay/sources.py).")
    ap.add_argument("--config", default=None, help="YAML recipe: a file, or the name of a shipped one "
                                                   "(selfplay-shapes, selfplay-real); none = the schema's defaults")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="continue at the first unfinished stage")
    ap.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: apply changed values of the keys a resume may change (train.epochs, "
                         "train.max_steps, log.*, checkpoint.*, dist.*, curation.batch_size, eval.batch_size and "
                         "other execution settings: train/resume.py); any other change is refused")
    ap.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun underneath)")
    ap.add_argument("--stop-after", default=None, metavar="STAGE", choices=STAGES,
                    help=f"stop once this call has completed STAGE of a round ({', '.join(STAGES)}); --resume "
                         f"continues")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. curation.steps=8 train.lr=1e-4")
    return ap


def selfplay_main(argv: list[str]) -> int:
    from hermesflow_fast.errors import UserError

    args = _parser("hermesflow selfplay").parse_intermixed_args(argv)  # flags may follow overrides
    if args.allow_config_change and not args.resume:
        raise UserError("--allow-config-change only applies with --resume")
    if args.nproc < 1:
        raise UserError(f"--nproc must be ≥ 1, got {args.nproc}")
    if args.nproc > 1 and "RANK" not in os.environ:
        have = os.cpu_count() or 1
        if args.nproc > have:
            raise UserError(f"--nproc {args.nproc} but this machine has {have} CPU cores")
        _config(args)  # refuse here, before torchrun's own output would bury the one line
        i = argv.index("--nproc")
        rest = argv[:i] + argv[i + 2:]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "hermesflow_fast.selfplay", *rest]
        return subprocess.call(cmd)
    return _run(args, list(args.overrides))


def _config(args):
    """The resolved config, and the run folder checked against it (read-only)."""
    from hermesflow_fast.selfplay.config import SelfPlayConfig, check_data
    from hermesflow_fast.selfplay.rounds import check_run_dir
    from hermesflow_fast.train.config import load_config

    cfg = load_config(args.config, list(args.overrides), schema=SelfPlayConfig)
    check_data(cfg)
    check_run_dir(cfg, args.run_dir, args.resume, getattr(args, "allow_config_change", False))
    return cfg


def _run(args, overrides: list[str]) -> int:
    from hermesflow_fast.selfplay.report import format_table
    from hermesflow_fast.selfplay.rounds import run_selfplay
    from hermesflow_fast.train.distributed import shutdown

    args.overrides = overrides
    cfg = _config(args)
    t0 = time.perf_counter()
    try:
        results = run_selfplay(cfg, args.run_dir, args.rounds, resume=args.resume, stop_after=args.stop_after,
                               allow_config_change=getattr(args, "allow_config_change", False))
    finally:
        shutdown()
    if args.stop_after and len(results) < args.rounds + 1:
        return 0  # stopped early: no table or report yet
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir = Path(args.run_dir)
        print("\n" + format_table(results))
        print(f"\n{args.rounds} round(s) in {time.perf_counter() - t0:.0f} s; report: {run_dir / 'report.md'}, "
              f"plot: {run_dir / 'gap.png'}, scores: {run_dir / 'summary.json'}")
    return 0


def demo(run_dir: str, rounds: int) -> int:
    """Two self-play rounds from the shipped base with the shapes recipe (what `make demo` runs); a finished run dir
    is reported again."""
    run = Path(run_dir)
    if (run / "summary.json").is_file():
        done = json.loads((run / "summary.json").read_text())["rounds"]
        if len(done) >= rounds + 1:
            from hermesflow_fast.selfplay.report import format_table

            print(format_table(done) + f"\n(already done; report: {run / 'report.md'}, plot: {run / 'gap.png'})")
            return 0
    args = argparse.Namespace(config=DEMO_RECIPE, run_dir=run_dir, rounds=rounds, resume=run.exists(),
                              stop_after=None)
    return _run(args, [])
