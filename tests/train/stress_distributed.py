"""Stress check, not collected by pytest: the 2-process tiny training N times in a row, counting aborts.

    .venv/bin/python tests/train/stress_distributed.py --runs 20 [--strategy ddp|fsdp] [--resume]

Each run is `hermesflow train --nproc 2` (gloo, torchrun underneath) on configs/tiny.yaml with 16 synthetic pairs;
a run passes when it exits 0 and neither rank printed an abort ("terminate called", a signal, a traceback). With
--resume every run continues the previous run dir after its last checkpoint is removed (the resume path too).
Prints one line per run and a final count; exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["log.progress=false", "data.synthetic_pairs=16", "train.epochs=2", "train.batch_size=4",
        "checkpoint.every=4", "checkpoint.keep=4"]
ABORT_MARKS = ("terminate called", "SIGABRT", "Signal 6", "Traceback", "core dumped")


def one_run(run_dir: Path, strategy: str, resume: bool) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "hermesflow_fast.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--run-dir", str(run_dir), "--nproc", "2", *ARGS, f"dist.strategy={strategy}"]
    if resume:
        cmd += ["--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--resume", action="store_true", help="each run resumes the last one after a lost checkpoint")
    ap.add_argument("--keep-logs", default=None, help="folder for the output of failed runs")
    args = ap.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="hff-stress-") as tmp:
        run_dir = Path(tmp) / "run"
        for i in range(1, args.runs + 1):
            resume = args.resume and run_dir.exists()
            if resume:
                shutil.rmtree(run_dir / "checkpoints" / "step-00000008", ignore_errors=True)
            elif run_dir.exists():
                shutil.rmtree(run_dir)
            code, secs, out = one_run(run_dir, args.strategy, resume)
            marks = [m for m in ABORT_MARKS if m in out]
            ok = code == 0 and not marks
            failed += not ok
            print(f"run {i:2d}/{args.runs}: exit {code}, {secs:5.1f}s, {'ok' if ok else 'FAILED ' + ', '.join(marks)}",
                  flush=True)
            if not ok and args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                (Path(args.keep_logs) / f"run-{i}.log").write_text(out)
    print(f"{args.runs - failed} of {args.runs} runs passed ({args.strategy}{', resume' if args.resume else ''})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
