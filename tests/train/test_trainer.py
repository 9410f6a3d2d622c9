"""The Pair-DPO trainer end to end on CPU: the tiny recipe trains and logs TRL's names; a run SIGKILLed mid-way and
resumed gives the loss sequence of an uninterrupted run exactly; precomputed reference log-probs give the same
losses as the reference model; bad runs fail clearly and overwrite nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hermesflow_fast.train.cli import launch

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["log.progress=false", "data.synthetic_pairs=32", "train.epochs=2", "train.batch_size=4",
        "checkpoint.every=2", "checkpoint.keep=2"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hermesflow_fast.train", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=600, **kw)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    proc = _run(["--config", TINY, "--run-dir", str(run_dir), *FAST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_tiny_recipe_trains_and_logs_trl_names(full_run):
    m = _metrics(full_run)
    assert [r["step"] for r in m] == list(range(1, 17))
    for key in ("loss", "lr", "grad_norm", "und/rewards/margins", "und/rewards/accuracies", "gen/rewards/margins",
                "gen/rewards/chosen", "gen/logps/rejected", "pairs_per_s", "tokens_per_s"):
        assert key in m[-1], key
    assert abs(m[0]["loss"] - 2 * 0.6931471805599453) < 1e-5  # policy == reference at step 1: ℓ = 2·log 2
    assert sum(r["loss"] for r in m[-4:]) / 4 < m[0]["loss"] - 0.05  # it learns the preferences
    assert m[0]["lr"] == 0.0 and max(r["lr"] for r in m) > 0
    assert (full_run / "config.yaml").is_file() and (full_run / "vocab.json").is_file()
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == ["step-00000014", "step-00000016"]  # keep = 2


def test_sigkill_then_resume_gives_the_same_losses(full_run, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hermesflow_fast.train", "--config", TINY, "--run-dir", str(run_dir), *FAST]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 9 is logged: checkpoint 8 exists, 9 is past it
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 9:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _run(["--config", TINY, "--run-dir", str(run_dir), "--resume", "auto", *FAST])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    got, want = _metrics(run_dir), _metrics(full_run)
    assert [r["step"] for r in got] == list(range(1, 17))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # exact on CPU
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]


def test_precomputed_reference_logps_give_the_same_losses(full_run, tmp_path):
    proc = _run(["--config", TINY, "--run-dir", str(tmp_path / "pre"), *FAST, "train.precompute_ref_logps=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precomputed" in proc.stdout + proc.stderr
    got, want = _metrics(tmp_path / "pre"), _metrics(full_run)
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)


def test_a_run_dir_holding_another_run_is_refused(full_run, capsys):
    with pytest.raises((SystemExit, ValueError), match="different run|already holds"):
        launch(["--config", TINY, "--run-dir", str(full_run), *FAST, "train.lr=0.5"])
    with pytest.raises(ValueError, match="already holds checkpoints"):
        launch(["--config", TINY, "--run-dir", str(full_run), *FAST])
    assert len(_metrics(full_run)) == 16  # nothing overwritten


def test_unknown_key_and_too_many_processes(tmp_path):
    with pytest.raises(SystemExit, match="did you mean 'train.lr'"):
        launch(["--config", TINY, "--run-dir", str(tmp_path), "train.learning_rate=1"])
    with pytest.raises(SystemExit, match="--nproc 4096 but this machine has"):
        launch(["--config", TINY, "--run-dir", str(tmp_path), "--nproc", "4096"])


def test_dry_run_prints_config_data_and_memory(tmp_path, capsys):
    assert launch(["--config", TINY, "--run-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "synthetic: 64 pairs" in out and "memory estimate" in out
    assert not (tmp_path / "checkpoints").exists()


def test_nan_stops_with_step_and_last_checkpoint(tmp_path):
    proc = _run(["--config", TINY, "--run-dir", str(tmp_path / "nan"), *FAST, "train.lr=1e38", "train.beta=1e30"])
    assert proc.returncode != 0
    assert "non-finite loss or gradient" in proc.stderr and "last good checkpoint" in proc.stderr
    skip = _run(["--config", TINY, "--run-dir", str(tmp_path / "skip"), *FAST, "train.lr=1e38", "train.beta=1e30",
                 "train.nan_policy=skip"])
    assert skip.returncode == 0, skip.stderr[-2000:]
    assert _metrics(tmp_path / "skip")[-1]["skipped_steps"] > 0


def test_text_dropout_is_one_draw_per_pair(tmp_path):
    from hermesflow_fast.train.config import load_config
    from hermesflow_fast.train.trainer import Trainer

    cfg = load_config(TINY, [*FAST, "train.text_dropout=0.5", f"run.run_dir={tmp_path}"])
    tr = Trainer(cfg, log=lambda m: None).setup()
    pairs = tr.data.pairs[:16]
    a, b = tr._drop_text(pairs, 0), tr._drop_text(pairs, 0)
    dropped = [x.prompt_ids == [] for x in a]
    assert dropped == [x.prompt_ids == [] for x in b] and 2 <= sum(dropped) <= 14  # seeded, about half
    assert [x.prompt_ids == [] for x in tr._drop_text(pairs, 1)] != dropped  # a new draw each epoch
    from hermesflow_fast.data.batching import pair_sequences

    v = tr.data.vocab
    pair = next(x for x in a if x.prompt_ids == [])
    gen = pair_sequences(tr.data.layout, pair, 0, cfg.run.seed)["gen"]
    ids = gen.input_ids[0][gen.mask.valid[0]].tolist()
    i = ids.index(v.t2i)
    assert ids[i:i + 4] == [v.t2i, v.bos, v.eos, v.soi]  # the empty prompt, shared by chosen and rejected
    assert ids.count(v.t2i) == 1 and ids.count(v.soi) == 2


def test_a_step_under_bf16_autocast_runs_and_matches_fp32(tmp_path):
    """bf16 autocast (CUDA's default; CPU autocast stands in here) through the model, the reference and the fused
    Pair-DPO head: the step runs, its gradients reach the fp32 master weights, and its loss is fp32's to bf16
    precision (a dtype mix inside the fused op once broke this step on an H100)."""
    import torch

    from hermesflow_fast.train.config import load_config
    from hermesflow_fast.train.trainer import Trainer

    losses = {}
    for name in ("fp32", "bf16"):
        cfg = load_config(TINY, [*FAST, f"run.run_dir={tmp_path / name}"])
        tr = Trainer(cfg, log=lambda m: None).setup()
        if name == "bf16":
            tr.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        losses[name] = tr.train_step(0)["loss"]
        assert all(p.dtype == torch.float32 for p in tr.policy.parameters())
    assert abs(losses["bf16"] - losses["fp32"]) < 2e-2, losses
