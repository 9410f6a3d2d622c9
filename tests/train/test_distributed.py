"""Two CPU processes (gloo, torchrun underneath `hermesflow train --nproc 2`) train like one process with the whole
batch, and resume under two processes continues exactly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
ARGS = ["log.progress=false", "data.synthetic_pairs=16", "train.epochs=2", "train.batch_size=4",
        "checkpoint.every=4", "checkpoint.keep=4"]

pytestmark = pytest.mark.slow


def _train(run_dir: Path, nproc: int, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "hermesflow_fast.cli", "train", "--config", TINY, "--run-dir", str(run_dir),
           "--nproc", str(nproc), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    return run_dir, _train(run_dir, 2)


def test_two_processes_match_one_process_with_the_whole_batch(two_procs, tmp_path):
    _, two = two_procs
    one = _train(tmp_path / "one", 1)
    assert len(one) == len(two) == 8
    for a, b in zip(one, two):
        assert b["pairs"] == a["pairs"] == 4
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-5)
        assert b["und/rewards/margins"] == pytest.approx(a["und/rewards/margins"], rel=1e-3, abs=1e-4)


def test_resume_under_two_processes(two_procs, tmp_path):
    run_dir, two = two_procs
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000008")  # as if the run died after the step-4 checkpoint
    again = _train(copy, 2, "--resume", "auto")
    assert [r["step"] for r in again] == list(range(1, 9))
    assert [r["loss"] for r in again] == [r["loss"] for r in two]


def test_fsdp2_matches_ddp_and_resumes(two_procs, tmp_path):
    _, ddp = two_procs
    fsdp = _train(tmp_path / "fsdp", 2, "dist.strategy=fsdp")
    for a, b in zip(ddp, fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-00000008")
    again = _train(tmp_path / "fsdp", 2, "dist.strategy=fsdp", "--resume", "auto")
    assert [r["loss"] for r in again] == [r["loss"] for r in fsdp]


_SHUTDOWN_SCRIPT = """
import os, sys, torch
from hermesflow_fast.train.distributed import init_distributed, shutdown, wrap_model

class Net(torch.nn.Module):  # the shape wrap_model's FSDP path expects: .policy.model.layers
    def __init__(self):
        super().__init__()
        self.policy = torch.nn.Module()
        self.policy.model = torch.nn.Module()
        self.policy.model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    def forward(self, x):
        for layer in self.policy.model.layers:
            x = layer(x)
        return x

info = init_distributed()
model = wrap_model(Net(), info, sys.argv[1])
model(torch.ones(2, 4)).sum().backward()
del model
shutdown()
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(f"threads-{info.rank}.txt", "w") as f:  # a file per rank: the ranks' stdout lines can interleave
    f.write(f"rank {info.rank} threads {threads}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_shutdown_leaves_no_backend_threads(tmp_path, strategy):
    """After shutdown() no gloo thread is left to race the interpreter's exit (the cause of rank aborts:
    'terminate called without an active exception')."""
    script = tmp_path / "shutdown.py"
    script.write_text(_SHUTDOWN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), strategy]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = [(tmp_path / f"threads-{rank}.txt").read_text() for rank in (0, 1)]
    assert lines == ["rank 0 threads ['python']", "rank 1 threads ['python']"], proc.stdout
