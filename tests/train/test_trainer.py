"""The Pair-DPO trainer end to end on CPU: the tiny recipe trains and logs TRL's names; a run SIGKILLed mid-way and
resumed gives the loss sequence of an uninterrupted run exactly; precomputed reference log-probs give the same
losses as the reference model; gradient accumulation gives the gradients of the whole batch; bad runs fail with one
`error:` line (exit 2) and change nothing already written; a resume applies a longer run's schedule only when asked."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hermesflow_fast.errors import UserError
from hermesflow_fast.train.cli import launch, main

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
    with pytest.raises(UserError, match="did you mean 'train.lr'"):
        launch(["--config", TINY, "--run-dir", str(tmp_path), "train.learning_rate=1"])
    with pytest.raises(UserError, match="--nproc 4096 but this machine has"):
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


# ----------------------------------------------------------------------------------- one-line errors and resumes


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """`python -m hermesflow_fast.train ARGV` in this process → (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _files(run_dir: Path) -> dict[str, bytes]:
    """What a refusal must leave as it was: the run's own files and its checkpoint folders."""
    names = ["config.yaml", "vocab.json", "metrics.jsonl", *(f"checkpoints/{p.name}" for p in
                                                           sorted((run_dir / "checkpoints").glob("*")))]
    return {n: (run_dir / n).read_bytes() if (run_dir / n).is_file() else b"" for n in names}


def test_resume_with_other_settings_is_refused_and_changes_nothing(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    before = _files(run)
    args = ["--config", TINY, "--run-dir", str(run), "--resume", "auto", *FAST]
    code, err = _cli([*args, "train.lr=5e-3", "train.epochs=3"], capsys)
    line = _error_line(err)
    assert code == 2 and "train.lr: 0.001 → 0.005 cannot change once a run has begun" in line
    assert "--init-from " + str(run / "checkpoints" / "step-00000016") in line
    code, err = _cli([*args, "train.epochs=3"], capsys)
    assert code == 2 and "train.epochs: 2 → 3; pass --allow-config-change" in _error_line(err)
    code, err = _cli(["--config", TINY, "--run-dir", str(run), *FAST, "--allow-config-change"], capsys)
    assert code == 2 and "only applies with --resume auto" in _error_line(err)
    assert _files(run) == before


def test_resume_with_more_epochs_trains_on_the_new_schedule(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    assert launch(["--config", TINY, "--run-dir", str(run), "--resume", "auto", "--allow-config-change", *FAST,
                   "train.epochs=3"]) == 0
    assert "applying train.epochs: 2 → 3 from step 16" in capsys.readouterr().out
    got, want = _metrics(run), _metrics(full_run)
    assert [r["step"] for r in got] == list(range(1, 25))
    assert got[:16] == want
    total, warmup = 24, math.ceil(0.1 * 24)  # the schedule over the new step count, from the resumed step on
    for r in got[16:]:
        s = r["step"] - 1
        assert r["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    text = (run / "config.yaml").read_text()
    assert "# changed on resume at step 16: train.epochs: 2 → 3" in text and "epochs: 3" in text


def test_resume_onto_weights_of_another_model_names_the_tensors(tmp_path, capsys):
    """The config is the same (model.init_from names the same folder) but the folder now holds another model: the
    checkpoint's tensor shapes are compared with the model before anything is written."""
    import torch

    from hermesflow_fast.model import ModelConfig, UnifiedTransformer
    from hermesflow_fast.train.dataset import synthetic_vocabulary

    vocab = synthetic_vocabulary()
    init, run = tmp_path / "init", tmp_path / "run"

    def weights(hidden: int) -> None:
        torch.manual_seed(0)
        UnifiedTransformer(ModelConfig.tiny(vocab_size=vocab.vocab_size, hidden_size=hidden)).save_pretrained(init)
        (init / "vocab.json").write_text(json.dumps(vocab.to_dict()))

    weights(64)
    args = ["--config", TINY, "--run-dir", str(run), "--init-from", str(init), *FAST, "train.max_steps=2"]
    assert launch(args) == 0
    before = _files(run)
    weights(32)
    code, err = _cli([*args, "--resume", "auto"], capsys)
    line = _error_line(err)
    assert code == 2 and "holds another model than this config builds" in line
    assert f"model.embed_tokens.weight is ({vocab.vocab_size}, 64) in the checkpoint but ({vocab.vocab_size}, 32) " \
           "in the model" in line
    assert _files(run) == before


def test_every_checkpoint_corrupt_starts_over_with_a_fresh_metrics_file(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--config", TINY, "--run-dir", str(run), *FAST, "train.max_steps=4"]
    assert launch(args) == 0
    old = (run / "metrics.jsonl").read_text()
    for ck in (run / "checkpoints").iterdir():
        data = bytearray((ck / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ck / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert launch([*args, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    said = [ln for ln in out.splitlines() if "can be used" in ln]
    assert len(said) == 1 and "step-00000004: model.safetensors: sha256 differs" in said[0]
    assert "step-00000002: model.safetensors: sha256 differs" in said[0] and "starting again at step 0" in said[0]
    assert "kept in " + str(run / "metrics.jsonl.1") in out
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]  # no step twice in one file
    assert (run / "metrics.jsonl.1").read_text() == old


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    import torch

    real_save, calls = torch.save, []

    def fills_the_disk(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    run = tmp_path / "run"
    code, err = _cli(["--config", TINY, "--run-dir", str(run), *FAST, "train.max_steps=4"], capsys)
    line = _error_line(err)
    assert code == 2 and line.startswith("error: checkpoint step 4: cannot write ")
    assert "optimizer.pt: No space left on device (disk full" in line and "folder was removed" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]


def test_init_from_a_missing_folder_is_one_line(tmp_path, capsys):
    code, err = _cli(["--config", TINY, "--run-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / "nope"),
                      *FAST], capsys)
    assert code == 2
    assert _error_line(err) == f"error: --init-from / model.init_from '{tmp_path / 'nope'}': no such file or folder"
    assert not (tmp_path / "run").exists()


def test_nproc_into_another_runs_dir_is_refused_before_torchrun(full_run, capsys, monkeypatch):
    from hermesflow_fast.train import cli

    monkeypatch.setattr(cli, "_available_procs", lambda: (8, "CPU cores"))
    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **kw: pytest.fail("torchrun was started"))
    before = _files(full_run)
    code, err = _cli(["--config", TINY, "--run-dir", str(full_run), "--nproc", "2", *FAST, "train.lr=0.5"], capsys)
    assert code == 2 and "already holds a different run (train.lr: 0.001 → 0.5)" in _error_line(err)
    code, err = _cli(["--config", TINY, "--run-dir", str(full_run), "--nproc", "2", *FAST], capsys)
    assert code == 2 and "already holds checkpoints; pass --resume auto" in _error_line(err)
    assert _files(full_run) == before


def test_a_non_finite_value_is_refused_before_the_run_dir_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _cli(["--config", TINY, "--run-dir", str(run), *FAST, "train.beta=inf"], capsys)
    assert code == 2
    assert _error_line(err) == "error: override 'train.beta=inf': 'train.beta' = inf must be a finite number"
    code, err = _cli(["--config", TINY, "--run-dir", str(run), *FAST, "train.adam_betas=[0.9,.nan]"], capsys)
    assert code == 2 and "must be a finite number" in _error_line(err)
    assert not run.exists()


def test_a_batch_larger_than_the_data_is_said(tmp_path):
    from hermesflow_fast.train.config import load_config
    from hermesflow_fast.train.trainer import Trainer

    said: list[str] = []
    cfg = load_config(TINY, [*FAST, "data.synthetic_pairs=6", "train.batch_size=4", "train.grad_accum=2",
                             f"run.run_dir={tmp_path}"])
    tr = Trainer(cfg, log=said.append).setup()
    assert tr.batch_size == 6 and tr.steps_per_epoch == 1
    assert ("note: train.batch_size 4 × train.grad_accum 2 = 8 pairs per step, but the data holds 6: each step "
            "takes all 6 pairs") in said


def test_grad_accum_2_of_batch_b_gives_the_gradients_of_batch_2b(tmp_path):
    """An optimizer step of grad_accum micro-steps of batch_size pairs is the step of batch_size × grad_accum pairs:
    the same pairs, each weighing 1 / pairs of the step (not 1 / pairs of its micro-step)."""
    import torch

    from hermesflow_fast.train.config import load_config
    from hermesflow_fast.train.trainer import Trainer

    got = {}
    for name, extra in (("batch 8", ["train.batch_size=8"]), ("4 × 2", ["train.batch_size=4", "train.grad_accum=2"])):
        cfg = load_config(TINY, [*FAST, *extra, f"run.run_dir={tmp_path / name[0]}"])
        tr = Trainer(cfg, log=lambda m: None).setup()
        ids = sorted(p.id for p in tr.step_pairs(0)[0])
        sums, n_step, _ = tr.accumulate(0)
        got[name] = (ids, n_step, tr.steps_per_epoch, sums, [p.grad.clone() for p in tr.policy.parameters()])
    (ids_a, n_a, spe_a, sums_a, ga), (ids_b, n_b, spe_b, sums_b, gb) = got.values()
    assert ids_a == ids_b and n_a == n_b == 8 and spe_a == spe_b == 4
    assert torch.allclose(sums_a, sums_b, rtol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in ga)
    for a, b in zip(ga, gb):  # equal up to the order of fp32 sums (micro-steps pack their pairs on their own)
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_no_process_is_left_without_a_pair():
    """The epoch's last step takes a remainder smaller than the world (a rank with no pair would hang DDP)."""
    import torch

    from hermesflow_fast.train.config import load_config
    from hermesflow_fast.train.distributed import DistInfo
    from hermesflow_fast.train.trainer import Trainer, _steps_per_epoch

    assert [_steps_per_epoch(n, 4, 2) for n in (8, 9, 10, 3)] == [2, 2, 3, 1]
    seen = []
    for rank in (0, 1):
        tr = Trainer(load_config(TINY, FAST), info=DistInfo(rank, 2, rank, torch.device("cpu")))
        tr.data = type("D", (), {"pairs": list(range(9))})()
        tr.batch_size, tr.steps_per_epoch = 4, _steps_per_epoch(9, 4, 2)
        shares = [tr.step_pairs(s)[0] for s in range(2)]
        assert all(shares) and [tr.step_pairs(s)[1] for s in range(2)] == [4, 5]
        seen += [j for share in shares for j in share]
    assert sorted(seen) == list(range(9))


def test_gen_estimator_knobs_keep_the_step_split_free_and_the_precomputed_reference_exact(tmp_path):
    """With several summed-or-averaged masks and the RPO term on: batch 8 = 4 × 2 accumulated, and reference
    log-probs precomputed give the loss and gradients of the live reference model."""
    import torch

    from hermesflow_fast.train.config import load_config
    from hermesflow_fast.train.trainer import Trainer

    knobs = ["train.gen_masks=3", "train.gen_logp=mean", "train.rpo_alpha=1.0", "train.gen_mask_ratio=[0.1,1.0]"]
    got = {}
    for name, extra in (("batch 8", ["train.batch_size=8"]), ("4 × 2", ["train.batch_size=4", "train.grad_accum=2"]),
                        ("pre", ["train.batch_size=8", "train.precompute_ref_logps=true"])):
        cfg = load_config(TINY, [*FAST, *knobs, *extra, f"run.run_dir={tmp_path / name[0]}"])
        tr = Trainer(cfg, log=lambda m: None).setup()
        sums, n_step, _ = tr.accumulate(0)
        got[name] = (sums, [p.grad.clone() for p in tr.policy.parameters()])
    from hermesflow_fast.train.objective import side_stats_names

    (sa, ga), (sb, gb), (sc, gc) = got.values()
    assert torch.allclose(sa, sb, rtol=1e-6)
    # step 1: policy == reference, so rewards are 0 live and ±1e-7 precomputed (fp32); the rest agrees
    keep = [i for i, k in enumerate(side_stats_names()) if "rewards" not in k]
    assert torch.allclose(sa[keep], sc[keep], rtol=1e-6)
    assert float(sa[side_stats_names().index("gen/nll")]) > 0
    for other in (gb, gc):
        for a, b in zip(ga, other):
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
