"""The `hermesflow` console script: env report, the bench wrapper, tokenize, and the selfplay launcher's checks."""

import csv
import subprocess
import sys

from click.testing import CliRunner

from hermesflow_fast.cli import main


def test_env_reports_what_a_bug_report_needs():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    for key in ("torch", "CUDA available", "triton", "extension hermesflow_fast._C", "liger-kernel", "flash-attn"):
        assert key in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "hermesflow_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout and "env" in out.stdout


def test_bench_logprobs_wrapper_writes_rows(tmp_path):
    out = tmp_path / "x.csv"
    args = ["--H", "32", "--V", "200", "--tokens", "64", "--providers", "naive,ours", "--reps", "1",
            "--inprocess", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "hermesflow_fast.cli", "bench", "logprobs", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["kernel_provider"] for r in rows} == {"naive", "ours"}


def test_tokenize_command_builds_a_resumable_cache(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from hermesflow_fast.data.token_cache import TokenCache
    from hermesflow_fast.model.tokenizer_vq import PatchVQTokenizer, load_image

    imgs = torch.rand(6, 3, 16, 16) * 2 - 1
    tok = PatchVQTokenizer.fit(imgs, num_codes=8, seed=0, iters=2)
    tok.save_pretrained(tmp_path / "vq")
    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        arr = ((imgs[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(src / f"img{i}.png")
    (src / "broken.png").write_bytes(b"not a png")
    args = ["tokenize", str(src), "--tokenizer", str(tmp_path / "vq"), "--out", str(tmp_path / "cache")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "3 written" in first.output and "1 error" in first.output and "broken.png" in (
        tmp_path / "cache" / "errors.jsonl").read_text()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 written" in again.output
    cache = TokenCache(tmp_path / "cache")
    assert len(cache) == 3
    expect = tok.encode(load_image(src / "img1.png", 16).unsqueeze(0))[0]
    assert torch.equal(cache["img1"], expect)


def test_selfplay_nproc_into_a_used_run_dir_is_one_line_before_torchrun(tmp_path, capsys, monkeypatch):
    """`hermesflow selfplay --nproc 2` checks the config and the run folder in the launching process: the refusal is
    the only line (no torchrun output around it), exit status 2, and the folder is left as it was."""
    import os

    import pytest

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(subprocess, "call", lambda *a, **kw: pytest.fail("torchrun was started"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  seed: 0\n")
    for args, said in ((["--run-dir", str(run), "--nproc", "2"], f"run dir {run} is not empty; pass --resume"),
                       (["--run-dir", str(run), "--nproc", "2", "curation.steps=0"], "'curation.steps' = 0 must be")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(["selfplay", *args], standalone_mode=False)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0]
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    assert (run / "config.yaml").read_text() == "run:\n  seed: 0\n"
