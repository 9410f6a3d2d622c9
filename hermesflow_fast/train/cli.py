"""Argument handling shared by ``hermesflow train`` and ``python -m hermesflow_fast.train`` (torchrun's target).

    hermesflow train --config configs/tiny.yaml --run-dir DIR [--resume auto [--allow-config-change]] [--nproc N]
                     [--init-from PATH] [--dry-run] [key=value ...]

``--nproc N > 1`` re-launches this module under ``torch.distributed.run`` (torchrun) with N processes on this
machine; every rank then runs ``run_training``. The config and the run folder are checked in the launching process
first (train/resume.py), so a refusal is one ``error: …`` line and torchrun never starts. ``--dry-run`` prints the
resolved config, the dataset summary and the estimated memory, then exits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

__all__ = ["build_parser", "launch", "main", "run_training"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hermesflow train", description="Pair-DPO training (HermesFlow).")
    ap.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    ap.add_argument("--run-dir", default=None, help="output folder (default: run.run_dir or runs/<run.name>)")
    ap.add_argument("--resume", choices=("auto", "no"), default="no",
                    help="auto: continue from the latest complete checkpoint in the run dir")
    ap.add_argument("--allow-config-change", action="store_true",
                    help=f"with --resume: apply changed values of {changeable_keys()} (the lr schedule follows the "
                         f"new step count; config.yaml records the change); any other change is refused")
    ap.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun underneath)")
    ap.add_argument("--init-from", default=None, help="start from these weights (HF Phi, Show-o or our layout)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config, data and memory; exit")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 data.strict=false")
    return ap


def changeable_keys() -> str:
    from hermesflow_fast.train.resume import CHANGEABLE_ON_RESUME

    return ", ".join(k if "." in k else f"{k}.*" for k in CHANGEABLE_ON_RESUME if not k.startswith(("curation.",
                                                                                                  "eval.")))


def _available_procs() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA devices"
    return os.cpu_count() or 1, "CPU cores"


def launch(argv: list[str]) -> int:
    """Parse; run in this process, or re-launch under torchrun for --nproc > 1. Returns an exit code."""
    from hermesflow_fast.errors import UserError

    args = build_parser().parse_intermixed_args(argv)  # flags may follow the overrides
    if args.nproc < 1:
        raise UserError(f"--nproc must be ≥ 1, got {args.nproc}")
    if args.nproc > 1 and "RANK" not in os.environ:
        have, what = _available_procs()
        if args.nproc > have:
            raise UserError(f"--nproc {args.nproc} but this machine has {have} {what}")
        cfg = _config(args)
        if not args.dry_run:  # refuse here, before torchrun's own output would bury the one line
            _trainer(cfg, args).check_run_dir(verify=False)
        rest = [a for a in argv if not a.startswith("--nproc")]
        if "--nproc" in argv:
            i = argv.index("--nproc")
            rest = argv[:i] + argv[i + 2:]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "hermesflow_fast.train", *rest]
        return subprocess.call(cmd)
    return run_training(args)


def _config(args: argparse.Namespace):
    from hermesflow_fast.train.config import load_config

    overrides = list(args.overrides)
    if args.init_from:
        overrides.append(f"model.init_from={args.init_from}")
    return load_config(args.config, overrides)


def _trainer(cfg, args: argparse.Namespace):
    from hermesflow_fast.errors import UserError
    from hermesflow_fast.train.trainer import Trainer

    if args.allow_config_change and args.resume != "auto":
        raise UserError("--allow-config-change only applies with --resume auto")
    return Trainer(cfg, run_dir=args.run_dir, resume=args.resume == "auto",
                   allow_config_change=args.allow_config_change)


def run_training(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.dry_run:
        return _dry_run(cfg, args)
    from hermesflow_fast.train.distributed import shutdown

    trainer = _trainer(cfg, args)
    try:
        trainer.setup()
        trainer.train()
    finally:
        del trainer  # its DDP/FSDP wrappers hold the process group: released before shutdown() frees it
        shutdown()
    return 0


def _dry_run(cfg, args) -> int:
    import yaml

    from hermesflow_fast.train.config import config_to_dict
    from hermesflow_fast.train.dataset import load_train_data
    from hermesflow_fast.train.memory import estimate_memory

    print("# resolved config")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    data = load_train_data(cfg)
    print(f"# data: {data.summary}")
    print(estimate_memory(cfg, data))
    return 0


def main(argv: list[str] | None = None) -> None:
    from hermesflow_fast.errors import user_errors

    with user_errors():
        code = launch(sys.argv[1:] if argv is None else argv)
    raise SystemExit(code)
